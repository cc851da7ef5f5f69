"""
The checks a run makes before it writes anything: every flag's value, and a checkpoint or model from elsewhere
against the flags. Each failure is one UsageError naming the fix.
"""
import argparse
import glob
import math
import os
from dataclasses import asdict, fields

from errors import CorruptCheckpoint, UsageError


def data_identity(path):
    """What --data holds, whatever its spelling (./input.txt, a moved checkout): its files' names and
    sizes."""
    files = [path] if path.endswith(".txt") else sorted(glob.glob(os.path.join(path, "*_*.npy"))
                                                         + glob.glob(os.path.join(path, "*_*.bin")))
    return [(os.path.basename(f), os.path.getsize(f)) for f in files]


def check_same_data(path, rank_0_data):
    if data_identity(path) != rank_0_data:
        raise UsageError(f"--data {path} holds other files here than on rank 0: "
                         "give every node the same shards")


# a resumed run follows the command line for these; the data order depends on the ones it refuses to change
FOLLOWED = ("max_lr", "min_lr", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "muon_lr",
            "muon_momentum")
DATA_ORDER = ("seed", "shuffle", "seq_len", "total_batch_size")


def check_shape(config, model_cfg, given, source):
    """A model from elsewhere (a checkpoint to resume, --init_from) keeps its own shape: only a shape flag set
    on the command line (or by the preset) that disagrees with it is an error."""
    clash = [f"--{k} {getattr(model_cfg, k)} but it has {v}" for k, v in config.items()
             if k in given and getattr(model_cfg, k) != v]
    if clash:
        raise UsageError(f"{source} is a model of another shape: " + ", ".join(clash)
                         + "; drop those flags (the model's shape is used) "
                         "or pass another --log_dir / --init_from")


def check_config(model_cfg, cfg, sample_cfg, gpt2_vocab):
    """Every flag's value, checked before a model is built or a file written: a bad one is one UsageError."""
    def need(ok, name, takes):
        if not ok:
            raise UsageError(f"--{name} {getattr(values, name)}: it takes {takes}")
    values = argparse.Namespace(**asdict(model_cfg), **asdict(cfg), **asdict(sample_cfg))
    for f in fields(model_cfg) + fields(cfg) + fields(sample_cfg):
        value = getattr(values, f.name)
        need(f.type is not float or value is None or math.isfinite(value), f.name, "a finite number")
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "batch_size", "seq_len",
                 "total_batch_size", "max_steps", "eval_interval", "val_tokens", "sample_interval",
                 "checkpoint_interval", "dist_timeout", "num_samples", "max_new_tokens", "top_k"):
        need(getattr(values, name) >= 1, name, "an integer >= 1")
    need(model_cfg.vocab_size >= gpt2_vocab, "vocab_size",
         f"an integer >= {gpt2_vocab}, the GPT-2 tokenizer's size")
    need(model_cfg.n_embd % model_cfg.n_head == 0, "n_embd", f"a multiple of --n_head {model_cfg.n_head}")
    need(cfg.max_lr > 0, "max_lr", "a learning rate > 0, e.g. 6e-4")
    need(cfg.optimizer in ("adamw", "muon"), "optimizer", "adamw or muon")
    need(cfg.muon_lr is None or cfg.muon_lr > 0, "muon_lr", "a learning rate > 0, e.g. 6e-4")
    need(0 <= cfg.muon_momentum < 1, "muon_momentum", "a number in [0, 1), e.g. 0.95")
    need(cfg.min_lr is None or 0 <= cfg.min_lr <= cfg.max_lr, "min_lr",
         f"a learning rate from 0 to --max_lr {cfg.max_lr}")
    need(cfg.weight_decay >= 0, "weight_decay", "a number >= 0, e.g. 0.1")
    need(cfg.core_max_per_task is None or cfg.core_max_per_task >= 1, "core_max_per_task", "an integer >= 1")
    need(cfg.skip_outliers >= 0, "skip_outliers", "a z-score > 0, e.g. 7 as llm.c's scripts (0: off)")
    need(cfg.grad_clip >= 0, "grad_clip", "a gradient norm >= 0 (0: no clipping), e.g. 1.0")
    need(cfg.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    need(0 <= cfg.seed < 2**64, "seed", "an integer from 0 to 2**64 - 1")
    need(sample_cfg.temperature >= 0, "temperature", "a number >= 0 (0: always the likeliest token)")
    need(not os.path.isfile(cfg.log_dir), "log_dir", "a folder, and that is a file: pass another --log_dir")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
         "auto, float32, bfloat16 or float16")
    need(cfg.wandb is None or cfg.wandb.strip() != "", "wandb", "a W&B project name")
    if cfg.wandb is not None:
        try:
            import wandb  # noqa: F401  only for --wandb: a run without it never needs the package
        except ImportError:
            raise UsageError(f"--wandb {cfg.wandb}: the wandb package is not installed; `pip install wandb` "
                             "(or drop --wandb)") from None
    if cfg.eval_only and (sample_cfg.sample or sample_cfg.export is not None):
        raise UsageError("--eval_only evaluates and exits, as --sample and --export do: pass one of them")
    if cfg.fsdp and cfg.optimizer == "muon":
        # Muon orthogonalises whole matrices, and a rank holds only row slices of them
        raise UsageError("--optimizer muon does not run with --fsdp "
                         "(each rank holds only slices of the matrices Muon orthogonalises): "
                         "use --optimizer adamw with --fsdp, or Muon without --fsdp")


def check_resume(ckpt, ckpt_path, cfg, model_cfg, given, master):
    """The checkpoint to resume, checked against the flags: a change that would alter the data order is
    refused."""
    check_shape(ckpt["config"], model_cfg, given, ckpt_path)
    args = ckpt["args"]
    changed = [f"--{k} {args[k]}" for k in DATA_ORDER if args[k] != getattr(cfg, k)]
    # older checkpoints name their data only by the --data string
    same_data = (ckpt["data"] == data_identity(cfg.data) if "data" in ckpt
                 else os.path.realpath(args["data"]) == os.path.realpath(cfg.data))
    if not same_data:
        changed.append(f"--data {args['data']} (other files than --data {cfg.data} holds now)")
    if changed:
        raise UsageError(f"{ckpt_path} was trained with " + ", ".join(changed)
                         + "; resume with the same values (or start a new --log_dir)")
    # the optimizer state fits one optimizer and one way of cutting c_attn; older checkpoints are AdamW's
    opt, split = args.get("optimizer", "adamw"), args.get("muon_split_qkv", True)
    if opt != cfg.optimizer or (opt == "muon" and split != cfg.muon_split_qkv):
        flags = f"--optimizer {opt}" + (f" --{'' if split else 'no-'}muon_split_qkv" if opt == "muon" else "")
        raise UsageError(f"{ckpt_path} was trained with {flags}; "
                         "resume with the same (or start a new --log_dir)")
    followed = [f"--{k} {getattr(cfg, k)} (was {args[k]})" for k in FOLLOWED
                if args.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    if followed and master:
        print(f"--resume follows the command line: {', '.join(followed)}", flush=True)
    return ckpt


def find_checkpoint(log_dir):
    ckpts = sorted(glob.glob(os.path.join(log_dir, "model_*.pt")))
    return ckpts[-1] if ckpts else None


def find_run(cfg, load):
    """The checkpoint to resume, or None for a fresh run that clobbers nothing. On rank 0: its disk decides.
    The newest checkpoint that `load` can read: one cut short by a host crash is skipped with a line, and
    kept."""
    if not cfg.resume:
        if find_checkpoint(cfg.log_dir) or os.path.exists(os.path.join(cfg.log_dir, "log.txt")):
            raise UsageError(f"'{cfg.log_dir}' already holds a run: pass --resume to continue it, "
                             "or a new --log_dir (or delete the folder) to start afresh")
        return None
    paths = sorted(glob.glob(os.path.join(cfg.log_dir, "model_*.pt")), reverse=True)
    for path in paths:
        try:
            load(path)
            return path
        except CorruptCheckpoint as e:
            print(f"--resume: skipping {path}, which does not load ({e}); it is kept", flush=True)
    if paths:  # starting over would rewrite log.txt, the run's history: the user decides, nothing is touched
        names = ", ".join(map(os.path.basename, paths))
        raise UsageError(f"--resume: none of the {len(paths)} checkpoint(s) in '{cfg.log_dir}' loads "
                         f"({names}); log.txt and they are left as they are: move them away to start afresh "
                         "there, or pass a new --log_dir")
    # a run killed before its first checkpoint: nothing to continue, so it starts over in its folder
    print(f"--resume: no checkpoint (model_*.pt) in '{cfg.log_dir}' yet: starting from step 0", flush=True)
    return None


def grad_accum_steps(cfg, world):
    B, T = cfg.batch_size, cfg.seq_len
    if cfg.total_batch_size % (B * T * world):
        ok = max(1, round(cfg.total_batch_size / (B * T * world))) * B * T * world
        raise UsageError(f"--total_batch_size {cfg.total_batch_size} is not divisible by batch_size * "
                         f"seq_len * world_size = {B}*{T}*{world}; use e.g. --total_batch_size {ok}")
    return cfg.total_batch_size // (B * T * world)
