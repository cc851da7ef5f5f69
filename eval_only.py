"""
--eval_only: any model measured as a run's eval step measures it, on the run's own val tokens (the first
--val_tokens of --data's val split, whatever the number of ranks), HellaSwag and, with --core, CORE, with
nothing written: what puts OpenAI's 3.2924 and 0.2955 beside a run on the same data. train_gpt2.py imports it
only for --eval_only.
"""
import json

import torch

import core
import hellaswag
from devices import resolve_precision
from memory_plan import check_eval_memory
from ranks import on_every_rank, on_rank_0
from run_checks import find_checkpoint
from train_gpt2 import DataLoader, UsageError, evaluate_val, find_data, get_tokenizer, load_model


def evaluate_only(cfg, model_cfg, sample_cfg, given, distributed, rank, world, device):
    """What a run's eval step prints, for --init_from (gpt2 ... gpt2-xl, a transformers folder or a .pt) or
    the newest checkpoint in --log_dir; train_gpt2.train() runs it in place of the loop."""
    source = cfg.init_from or on_rank_0(lambda: find_checkpoint(cfg.log_dir), distributed)
    if source is None:
        raise UsageError(f"--eval_only: no model to evaluate: pass --init_from (gpt2, a folder or a .pt), or "
                         f"a --log_dir with checkpoints ('{cfg.log_dir}' has none)")
    precision = resolve_precision(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as in training
    _, val_shards = on_every_rank(lambda: find_data(cfg.data), distributed)
    model = on_every_rank(lambda: load_model(source), distributed)
    block_size = model.config.block_size
    if cfg.seq_len > block_size:
        raise UsageError(f"--seq_len {cfg.seq_len} is longer than {source}'s block_size {block_size}")
    examples = (hellaswag.load_for_run(cfg.hellaswag_data, block_size, rank == 0, distributed)
                if cfg.hellaswag else None)
    # the eval data before the model: a missing bundle is said (and downloaded) before minutes of val
    tasks = (core.load_for_run(cfg.core_bundle, cfg.core_max_per_task, rank == 0, distributed)
             if cfg.core else None)
    # before the model moves to the GPU: a plan that does not fit stops every rank with the fix
    hellaswag_tokens = longest_row(examples, block_size)
    on_every_rank(lambda: check_eval_memory(model.config, cfg, precision.dtype, hellaswag_tokens, device,
                                            rank == 0), distributed)
    model.to(device)
    loader = DataLoader(val_shards, cfg.seq_len, model.config.vocab_size, shuffle=False)
    n_tokens = min(cfg.val_tokens // cfg.seq_len, loader.seqs_per_epoch) * cfg.seq_len
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    say(f"{source}: {model.num_params():,} parameters | {world} process(es) on {device} | "
        f"{precision.reason} | {n_tokens:,} val tokens of {cfg.data}, T={cfg.seq_len}", flush=True)
    result = {"model": source, "val_tokens": n_tokens}
    autocast = precision.autocast(device.type)
    # no graph to keep: evaluate_val runs autograd on for a run's compiled step, and nothing is compiled here
    with torch.no_grad():
        result["val_loss"] = evaluate_val(model, loader, cfg, rank, world, device, autocast, distributed)
    say(f"{source} | val loss {result['val_loss']:.4f}", flush=True)
    if examples is not None:
        correct, total = hellaswag.evaluate_ranks(model, examples, rank, world, device, precision,
                                                  distributed)
        result.update(hellaswag_examples=total, hellaswag_acc_norm=correct / total)
        say(f"{source} | {hellaswag.run_line(correct, total, precision)}", flush=True)
    if tasks is not None:
        scores = core.evaluate(model, tasks, device, rank, world, distributed,
                               autocast_dtype=precision.autocast_dtype,
                               say=lambda line: say(line, flush=True))
        result.update(core=scores["core"], core_results=scores["results"], core_centered=scores["centered"])
        say(f"{source} | CORE {scores['core']:.4f} | {core.openai_line()}", flush=True)
    say(json.dumps(result), flush=True)  # for scripts


def longest_row(examples, block_size):
    """Tokens in HellaSwag's longest row, as hellaswag.render_example cuts it (its context and its longest
    ending, at most block_size), which sets its first batch's length; 0 without examples."""
    encode = get_tokenizer().encode_ordinary
    return max((min(len(encode(ex["ctx"])) + max(map(len, hellaswag.ending_tokens(ex))), block_size)
                for ex in examples or ()), default=0)
