"""
--fsdp (FSDP2: parameters, gradients and AdamW's state sharded over the ranks) against the oracle of one process
without it, on CPU with gloo; the GPT-2 family's presets against transformers' parameter counts.
"""
import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
from conftest import ROOT, launch
from test_train import TINY, expect_error, read_log
from train_gpt2 import GPT, GPT2_VOCAB, DataLoader, GPTConfig, evaluate_val, load_model, main, parse_args

FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl"
FIXTURE_33 = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"  # its first 33
# accumulation 2 on each of 2 ranks (4 in one process); 9 val sequences, so rank 0 has a val batch more than
# rank 1, and HellaSwag's 33 examples split over the ranks, 17 (two forwards of 16) and 16 (one): under FSDP a
# rank that runs fewer forwards would hang the others.
# A resume at step 4 samples before any training forward.
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--total_batch_size", "512", "--max_steps", "8",
               "--eval_interval", "3", "--val_tokens", "288", "--checkpoint_interval", "4", "--hellaswag",
               "--hellaswag_data", str(FIXTURE_33), "--sample_interval", "4"]


def weights(path):
    return torch.load(path)["model"]


def max_weight_diff(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def max_log_diff(a, b, stream):
    a, b = read_log(a, stream), read_log(b, stream)
    assert a.keys() == b.keys() and a
    return max(abs(a[s] - b[s]) for s in a)


def cut_at_step_4(run_dir, cut_dir):
    """What a run killed right after its step-4 checkpoint leaves: that checkpoint and the log before step 4."""
    cut_dir.mkdir()
    shutil.copy(run_dir / "model_000004.pt", cut_dir)
    (cut_dir / "log.txt").write_text("".join(l for l in open(run_dir / "log.txt") if int(l.split()[0]) < 4))
    return cut_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The oracle (one process, no FSDP) and the same run with --fsdp on 2 ranks; each checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("fsdp")
    main(ARGS + ["--log_dir", str(tmp / "single")])  # in process: the oracle is not about the process boundary
    r = launch(ARGS + ["--log_dir", "fsdp", "--fsdp"], cwd=tmp, ranks=2)  # a hang fails the timeout
    assert r.returncode == 0, r.stderr
    assert "2 process(es) on cpu (FSDP)" in r.stdout and "accum=2" in r.stdout
    return tmp, r.stdout


@pytest.mark.slow
def test_fsdp_on_two_ranks_equals_one_process_without_it(runs):
    tmp, stdout = runs
    single, fsdp = tmp / "single", tmp / "fsdp"
    assert len(read_log(single / "log.txt", "train")) == 8
    for stream in ("train", "val"):
        assert max_log_diff(single / "log.txt", fsdp / "log.txt", stream) <= 1e-5, stream
    assert read_log(fsdp / "log.txt", "hella") == read_log(single / "log.txt", "hella")  # counts summed over ranks
    assert set(read_log(fsdp / "log.txt", "hella")) == {0, 3, 6, 7}
    assert max_weight_diff(single / "model_000008.pt", fsdp / "model_000008.pt") <= 1e-5
    # every rank samples under FSDP, but only rank 0 prints: samples at steps 4 and 7
    assert stdout.count("sample 0:") == 2


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_under_fsdp_and_on_one_process(runs, tmp_path):
    tmp, _ = runs
    # FSDP -> FSDP: the gathered checkpoint, cut back into shards, continues bit for bit
    cut = cut_at_step_4(tmp / "fsdp", tmp_path / "fsdp_again")
    r = launch(ARGS + ["--log_dir", str(cut), "--fsdp", "--resume"], cwd=tmp_path, ranks=2)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 4" in r.stdout
    assert (cut / "log.txt").read_text() == (tmp / "fsdp" / "log.txt").read_text()
    assert max_weight_diff(tmp / "fsdp" / "model_000008.pt", cut / "model_000008.pt") == 0
    # FSDP on 2 ranks -> 1 process without it, and 1 process -> FSDP on 2 ranks: the oracle's steps 4-7
    for source, flags, ranks in (("fsdp", [], None), ("single", ["--fsdp"], 2)):
        cut = cut_at_step_4(tmp / source, tmp_path / f"from_{source}")
        if ranks is None:  # one process: in this one
            main(ARGS + ["--log_dir", str(cut), "--resume"])
        else:
            r = launch(ARGS + ["--log_dir", str(cut), "--resume"] + flags, cwd=tmp_path, ranks=ranks)
            assert r.returncode == 0, r.stderr
        for stream in ("train", "val"):
            assert max_log_diff(tmp / "single" / "log.txt", cut / "log.txt", stream) <= 1e-5, (source, stream)
        assert max_weight_diff(tmp / "single" / "model_000008.pt", cut / "model_000008.pt") <= 1e-5, source


@pytest.mark.slow
def test_fsdp_checkpoint_loads_in_hellaswag_sample_and_export(runs, tmp_path, capsys):
    tmp, _ = runs
    fsdp_ckpt, single_ckpt = tmp / "fsdp" / "model_000008.pt", tmp / "single" / "model_000008.pt"
    idx = torch.randint(0, GPT2_VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, oracle = load_model(str(fsdp_ckpt)).eval()(idx)[0], load_model(str(single_ckpt)).eval()(idx)[0]
    assert (ours - oracle).abs().max().item() <= 1e-4
    scores = []
    capsys.readouterr()
    for ckpt in (fsdp_ckpt, single_ckpt):  # hellaswag.py's main, in this process
        hellaswag.main(["-m", str(ckpt), "--data", str(FIXTURE)])
        scores.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    fits = len(hellaswag.fit_to_block(hellaswag.load_examples(data=FIXTURE), 32)[0])  # TINY's block_size
    assert scores[0] == scores[1] and scores[0]["examples"] == fits
    main(["--init_from", str(fsdp_ckpt), "--sample", "--num_samples", "1", "--max_new_tokens", "8", "--prompt", "ROMEO:"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    main(["--init_from", str(fsdp_ckpt), "--export", str(tmp_path / "hf")])
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(idx).logits - ours[..., :GPT2_VOCAB]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_fsdp_compiled_blocks_match_eager(runs, tmp_path):
    tmp, _ = runs
    args = ARGS + ["--max_steps", "3", "--no-hellaswag", "--sample_interval", "2", "--block_size", "64"]
    r = launch(args + ["--log_dir", "compiled", "--fsdp", "--compile"], cwd=tmp_path, ranks=2, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "compile True" in r.stdout and "sample 0:" in r.stdout  # sampling ran the compiled blocks eagerly
    main(args + ["--log_dir", str(tmp_path / "eager")])
    for stream, tol in (("train", 1e-4), ("val", 2e-4)):  # compiled kernels round differently; val has 4 decimals
        assert max_log_diff(tmp_path / "eager" / "log.txt", tmp_path / "compiled" / "log.txt", stream) <= tol


def test_fsdp_in_one_process_equals_no_fsdp(tmp_path):
    # no torchrun: --fsdp makes a process group of one
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--eval_interval", "2"]
    main(args + ["--log_dir", str(tmp_path / "plain")])
    main(args + ["--log_dir", str(tmp_path / "fsdp"), "--fsdp"])
    for stream in ("train", "val"):
        assert max_log_diff(tmp_path / "plain" / "log.txt", tmp_path / "fsdp" / "log.txt", stream) <= 1e-6
    assert max_weight_diff(tmp_path / "plain" / "model_000004.pt", tmp_path / "fsdp" / "model_000004.pt") <= 1e-6


def test_fsdp_resumed_at_a_sample_step_trains_on_as_the_uninterrupted_run(tmp_path):
    # resumed at step 2, the first forward samples; under inference_mode FSDP2's gathered weights became
    # inference tensors and the next training forward died ("Inference tensors do not track version counter")
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--eval_interval", "4", "--fsdp",
                   "--sample_interval", "2", "--checkpoint_interval", "2", "--hellaswag", "--hellaswag_data",
                   str(FIXTURE)]
    main(args + ["--log_dir", str(tmp_path / "full")])
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "model_000002.pt", tmp_path / "cut")
    main(args + ["--log_dir", str(tmp_path / "cut"), "--resume"])
    assert read_log(tmp_path / "cut" / "log.txt", "train") == {
        s: v for s, v in read_log(tmp_path / "full" / "log.txt", "train").items() if s >= 2}
    assert max_weight_diff(tmp_path / "full" / "model_000004.pt", tmp_path / "cut" / "model_000004.pt") == 0


def test_a_checkpoint_in_the_old_index_keyed_format_resumes_exactly_under_fsdp(tmp_path):
    # --fsdp in one process. FSDP checkpoints now key the optimizer state by parameter name (DCP's format); older
    # ones, like those written without FSDP, keyed it by index as torch.optim does, and held the tied weight twice
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--checkpoint_interval", "2",
                   "--eval_interval", "2", "--fsdp"]
    full = tmp_path / "full"
    main(args + ["--log_dir", str(full)])
    ckpt = torch.load(full / "model_000002.pt")
    model, opt = ckpt["model"], ckpt["optimizer"]
    names = [n for group in opt["param_groups"] for n in group["params"]]
    assert set(opt["state"]) == set(names) and "lm_head.weight" not in names
    assert model["lm_head.weight"].data_ptr() == model["transformer.wte.weight"].data_ptr()  # stored once
    index = {n: i for i, n in enumerate(names)}
    ckpt["optimizer"] = {"state": {index[n]: s for n, s in opt["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in opt["param_groups"]]}
    model["lm_head.weight"] = model["lm_head.weight"].clone()
    cut = tmp_path / "cut"
    cut.mkdir()
    torch.save(ckpt, cut / "model_000002.pt")
    (cut / "log.txt").write_text("".join(l for l in open(full / "log.txt") if int(l.split()[0]) < 2))
    main(args + ["--log_dir", str(cut), "--resume"])
    assert (cut / "log.txt").read_text() == (full / "log.txt").read_text()
    assert max_weight_diff(full / "model_000004.pt", cut / "model_000004.pt") == 0


def test_muon_with_fsdp_is_a_clear_error(tmp_path):
    expect_error(TINY + ["--data", str(ROOT / "input.txt"), "--optimizer", "muon", "--fsdp",
                         "--log_dir", str(tmp_path / "log")], "--optimizer muon does not run with --fsdp")
    assert not (tmp_path / "log").exists()


class CountingModel(torch.nn.Module):
    """A stand-in for an FSDP model: counts its forwards, which under FSDP must be the same on every rank."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_every_rank_runs_the_same_number_of_val_and_hellaswag_forwards(tmp_path):
    from types import SimpleNamespace
    from test_train import make_shards
    make_shards(tmp_path, [60])
    loader = DataLoader([str(tmp_path / "test_val_000000.npy")], 16, 50304, shuffle=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    examples = hellaswag.load_examples(data=str(FIXTURE))[:9]  # 5 for rank 0, 4 for rank 1
    cfg = SimpleNamespace(val_tokens=9 * 16, seq_len=16, batch_size=4)  # 9 sequences: 5 and 4
    val_calls, hella_calls, counts = [], [], []
    for rank in range(2):
        counting = CountingModel(model)
        evaluate_val(counting, loader, cfg, rank, 2, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        val_calls.append(counting.calls)
        counting.calls = 0
        counts.append(hellaswag.evaluate(counting, examples, "cpu", batch_size=2, rank=rank, world_size=2))
        hella_calls.append(counting.calls)
    assert val_calls == [2, 2] and hella_calls == [3, 3]
    assert [c[0] for c in counts] == [5, 4]  # the extra forward scores nothing
    # and the val loss is still the mean over the 9 sequences, whatever the split
    whole = evaluate_val(model, loader, cfg, 0, 1, "cpu", torch.autocast("cpu", enabled=False))
    x, y = loader.batch(range(9))
    with torch.no_grad():
        assert whole == pytest.approx(model(x, y)[1].item(), abs=1e-6)


def test_a_family_preset_trains_on_its_recipe_at_a_tiny_shape(tmp_path, capsys):
    # what bench/gpu_check.py's medium check runs on a GPU: the preset's flags, the shape made tiny
    shape = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "--batch_size", "4",
             "--seq_len", "64", "--total_batch_size", "512", "--val_tokens", "640"]
    main(["--preset", "gpt2-medium", "--data", str(ROOT / "input.txt"), "--max_steps", "2", "--no-hellaswag",
          "--log_dir", str(tmp_path / "medium"), *shape])
    out = capsys.readouterr().out
    assert sorted(read_log(tmp_path / "medium" / "log.txt", "train")) == [0, 1]
    assert f"lr {3e-4 / 700:.4e}" in out and f"lr {2 * 3e-4 / 700:.4e}" in out  # gpt2-medium's warmup to 3e-4


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_family_presets_have_transformers_parameter_counts(preset):
    model_cfg, cfg, _, _ = parse_args(["--preset", preset])
    shape = dict(n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd)
    assert shape == {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
                     "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
                     "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600)}[preset]
    with torch.device("meta"):  # XL and its optimizer would not fit a CPU's memory
        ours = GPT(model_cfg).num_params()
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size, **shape))
        theirs = sum(p.numel() for p in hf.parameters())  # the tied wte / lm_head once, as ours
    assert ours == theirs
    # every step of the recipe fills whole micro-batches on 8 GPUs, and warmup ends before the decay does
    assert cfg.total_batch_size % (cfg.batch_size * cfg.seq_len * 8) == 0 and cfg.warmup_steps < cfg.max_steps
    assert preset == "gpt2" or (cfg.data == "edu_fineweb100B" and cfg.log_dir == f"log_{preset}")


@pytest.mark.slow
def test_fsdp_bf16_weights_train_within_bf16_noise_of_autocast(tmp_path):
    # --dtype bfloat16: FSDP gathers bf16 weights (its MixedPrecisionPolicy) and keeps the residual stream in bf16,
    # where autocast alone keeps fp32 weights and an fp32 residual stream; same steps, differences of bf16 size
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--eval_interval", "2", "--dtype", "bfloat16"]
    main(args + ["--log_dir", str(tmp_path / "autocast")])
    main(args + ["--log_dir", str(tmp_path / "fsdp"), "--fsdp"])
    a, b = (read_log(tmp_path / d / "log.txt", "train") for d in ("autocast", "fsdp"))
    assert a.keys() == b.keys() == {0, 1, 2}
    assert max(abs(a[s] - b[s]) for s in a) <= 5e-3 and a != b  # close, and not the fp32 path by mistake
    fp32 = torch.load(tmp_path / "fsdp" / "model_000003.pt")["model"]
    assert {v.dtype for v in fp32.values()} == {torch.float32}  # the checkpoint holds the fp32 masters
