import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import ROOT, free_port, launch
from train_gpt2 import (EOT, GPT, DataLoader, GPTConfig, accumulate_gradients, configure_optimizer, find_data, get_lr,
                        main, parse_args)

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--seq_len", "32", "--total_batch_size", "256", "--val_tokens", "512", "--no-hellaswag",
        "--sample_interval", "1000", "--checkpoint_interval", "1000", "--max_lr", "1e-3", "--warmup_steps", "3"]

# the compiled runs' shape (a context for HellaSwag's examples): the graph inductor compiles for the first, in its
# cache, serves the second
TINY_COMPILED = TINY + ["--block_size", "256"]


def run_script(args, cwd, launcher=None, timeout=300):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_gpt2.py")] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def main_1_thread(args):
    """main(args) in this process with run_script's thread count (OMP_NUM_THREADS=1): the thread count changes
    the float sums, so a run here is bit for bit a subprocess's only with one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args)
    finally:
        torch.set_num_threads(threads)


def read_log(path, stream):
    rows = [line.split() for line in open(path)]
    return {int(step): float(value) for step, s, value in rows if s == stream}


def assert_same_weights(ckpt_a, ckpt_b):
    a, b = torch.load(ckpt_a)["model"], torch.load(ckpt_b)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_shards(folder, docs_per_shard, seed=0, prefix="test"):
    """Shards whose non-EOT tokens are all distinct, so a token's count says how often it was read."""
    rng = np.random.default_rng(seed)
    next_id = 0
    os.makedirs(folder, exist_ok=True)
    for i, n_docs in enumerate(docs_per_shard):
        parts = []
        for _ in range(n_docs):
            length = int(rng.integers(5, 40))
            parts += [EOT] + list(range(next_id, next_id + length))
            next_id += length
        split = "val" if i == 0 else "train"
        np.save(os.path.join(folder, f"{prefix}_{split}_{i:06d}.npy"), np.array(parts, dtype=np.uint16))
    assert next_id < EOT
    return folder


# -----------------------------------------------------------------------------
# the optimizer and the schedule


def test_lr_schedule_warmup_and_cosine():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert get_lr(0, **kw) == pytest.approx(6e-4 / 715)
    assert get_lr(714, **kw) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert get_lr(mid, **kw) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert get_lr(19072, **kw) == pytest.approx(6e-5, rel=1e-3)
    assert get_lr(19073, **kw) == pytest.approx(6e-5)
    assert get_lr(30000, **kw) == 6e-5


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))
    opt = configure_optimizer(model, 0.1, 6e-4, "cpu")
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.h.1.mlp.c_proj.weight" in decayed
    assert not any(n.endswith(".bias") or ".ln_" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 128, (8, 16)), torch.randint(0, 128, (8, 16))
    big_loss = accumulate_gradients(model, [(x, y)], torch.autocast("cpu", enabled=False))
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    small_loss = accumulate_gradients(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)],
                                      torch.autocast("cpu", enabled=False))
    assert small_loss.item() == pytest.approx(big_loss.item(), abs=1e-6)
    for a, b in zip(big, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


# -----------------------------------------------------------------------------
# the data loader


def epoch_tokens(loader, world, B, accum, steps):
    seen = Counter()
    for step in range(steps):
        for rank in range(world):
            x, y = loader.step_batches(step, accum, rank, world, B)
            seen.update(x.flatten().tolist())
    return seen


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_reads_every_train_token_once_per_epoch(tmp_path, shuffle):
    make_shards(tmp_path, [5, 30, 45, 25])
    shards = sorted(str(p) for p in tmp_path.glob("*_train_*.npy"))
    T, B, world, accum = 16, 2, 2, 1
    loader = DataLoader(shards, T, 50304, seed=1, shuffle=shuffle)
    steps = loader.seqs_per_epoch // (B * world * accum)
    seen = epoch_tokens(loader, world, B, accum, steps)
    # (seqs_per_epoch % (B*world)) sequences fall into the next epoch's first step: count them back
    spill = loader.seqs_per_epoch - steps * B * world * accum
    for q in range(loader.seqs_per_epoch - spill, loader.seqs_per_epoch):
        seen.update(loader.sequence(q)[:-1].tolist())
    all_tokens = Counter()
    tail = 0
    for s in shards:
        t = np.load(s)
        all_tokens.update(t.tolist())
        tail += (len(t) - 1) % T + 1  # the last tokens of a shard that cannot fill a sequence (+1 target)
    assert sum(seen.values()) == sum(all_tokens.values()) - tail
    assert all(c == 1 for tok, c in seen.items() if tok != EOT)  # no token twice
    assert len(all_tokens) - len(seen) <= tail  # and none missing beyond the tail


def test_loader_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    make_shards(tmp_path, [5, 30, 45, 25])
    shards = sorted(str(p) for p in tmp_path.glob("*_train_*.npy"))
    a, b = DataLoader(shards, 16, 50304, seed=7), DataLoader(shards, 16, 50304, seed=7)
    n = a.seqs_per_epoch
    first = np.concatenate([a.sequence(q)[:-1] for q in range(n)])
    assert np.array_equal(first, np.concatenate([b.sequence(q)[:-1] for q in range(n)]))
    second = np.concatenate([a.sequence(q)[:-1] for q in range(n, 2 * n)])
    assert not np.array_equal(first, second)
    other_seed = DataLoader(shards, 16, 50304, seed=8)
    assert not np.array_equal(first, np.concatenate([other_seed.sequence(q)[:-1] for q in range(n)]))
    plain = DataLoader(shards, 16, 50304, shuffle=False)
    expected = np.load(shards[0])[:17]
    assert np.array_equal(plain.sequence(0), expected)
    # shuffling moves whole documents: each still starts with EOT and keeps its tokens in order
    docs = np.split(first, np.flatnonzero(first == EOT))
    assert all(np.all(np.diff(d[1:].astype(int)) == 1) for d in docs if len(d) > 2)


def test_global_batch_is_the_same_for_any_world_size(tmp_path):
    make_shards(tmp_path, [5, 60, 60])
    shards = sorted(str(p) for p in tmp_path.glob("*_train_*.npy"))
    loader = DataLoader(shards, 16, 50304, seed=3)
    for step in range(3):
        one = loader.step_batches(step, 4, 0, 1, 2)[0].flatten(0, 1)  # 4 micro-steps of 2 on one rank
        four = torch.cat([loader.step_batches(step, 1, r, 4, 2)[0][0] for r in range(4)])
        two = torch.cat([loader.step_batches(step, 2, r, 2, 2)[0][m] for m in range(2) for r in range(2)])
        assert torch.equal(one, four) and torch.equal(one, two)


def test_step_batches_are_the_loaders_sequences(tmp_path):
    # the prefetched (accum, B, T) tensors against the loader's own sequence(q), q = ((step*accum+m)*W+r)*B+b
    make_shards(tmp_path, [5, 60, 60])
    loader = DataLoader(sorted(str(p) for p in tmp_path.glob("*_train_*.npy")), 16, 50304, seed=3)
    step, accum, rank, world, B = 5, 3, 1, 2, 4
    x, y = loader.step_batches(step, accum, rank, world, B)
    assert x.shape == y.shape == (accum, B, 16) and x.dtype == y.dtype == torch.long
    for m in range(accum):
        for b in range(B):
            seq = torch.from_numpy(loader.sequence(((step * accum + m) * world + rank) * B + b).astype(np.int64))
            assert torch.equal(x[m, b], seq[:-1]) and torch.equal(y[m, b], seq[1:])


# -----------------------------------------------------------------------------
# end to end


def test_quickstart_preset_smoke(quickstart):
    folder, r = quickstart
    log = folder / "log_shakespeare" / "log.txt"
    lines = log.read_text().splitlines()
    assert lines[0] == "0 tokens_per_step 4096"
    assert lines[1].startswith("0 val ") and lines[2].startswith("0 train ")
    for line in lines[1:]:
        step, stream, value = line.split()
        assert stream in ("train", "val") and int(step) in (0, 1, 2, 3)
        assert len(value.split(".")[1]) == (6 if stream == "train" else 4)
    train = read_log(log, "train")
    assert train[3] < train[0] < 11.5
    assert "sample 0:" in r.stdout and "tok/s" in r.stdout
    assert (folder / "log_shakespeare" / "model_000004.pt").exists()


def test_resume_is_exact(tmp_path):
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "8", "--checkpoint_interval", "4",
                   "--eval_interval", "3"]
    full = tmp_path / "full"
    main(args + ["--log_dir", str(full)])
    # a run stopped after step 4: exactly what the uninterrupted run had on disk at that moment
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "model_000004.pt", cut)
    before = [l for l in (full / "log.txt").read_text().splitlines() if int(l.split()[0]) < 4]
    (cut / "log.txt").write_text("\n".join(before) + "\n")
    # killed after step 5 was logged, in the middle of a line: the resumed run logs steps 4 and 5 again
    after = [l for l in (full / "log.txt").read_text().splitlines() if 4 <= int(l.split()[0]) <= 5]
    (cut / "log.txt").write_text("\n".join(before + after) + "\n6 tra")
    main(args + ["--log_dir", str(cut), "--resume"])
    assert (cut / "log.txt").read_text() == (full / "log.txt").read_text()  # each step once, same values
    assert_same_weights(full / "model_000008.pt", cut / "model_000008.pt")


def test_training_loop_equals_a_plain_synchronous_loop(tmp_path):
    # the real loop (batches prefetched in a thread, one host sync per step) against the textbook one:
    # cut each micro-batch when it is needed, forward, backward, clip, set the lr, step
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "5", "--log_dir", str(tmp_path / "run")]
    main(args)
    logged = read_log(tmp_path / "run" / "log.txt", "train")
    model_cfg, cfg, _, _ = parse_args(args)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    loader = DataLoader(find_data(cfg.data)[0], cfg.seq_len, model_cfg.vocab_size, cfg.seed, cfg.shuffle)
    optimizer = configure_optimizer(model, cfg.weight_decay, cfg.max_lr, "cpu")
    B, accum = cfg.batch_size, cfg.total_batch_size // (cfg.batch_size * cfg.seq_len)
    for step in range(cfg.max_steps):
        optimizer.zero_grad()
        mean_loss = 0.0
        for micro in range(accum):
            x, y = loader.batch(range((step * accum + micro) * B, (step * accum + micro + 1) * B))
            loss = model(x, y)[1] / accum
            loss.backward()
            mean_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg.max_lr, 0.1 * cfg.max_lr, cfg.warmup_steps, cfg.max_steps)
        optimizer.step()
        assert logged[step] == pytest.approx(mean_loss, abs=2e-6), step


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, capsys):
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "5", "--checkpoint_interval", "4",
                   "--eval_interval", "2"]
    full = tmp_path / "full"
    main(args + ["--log_dir", str(full)])
    # killed after step 2 was logged, before the first checkpoint: a log and no model_*.pt
    cut = tmp_path / "cut"
    cut.mkdir()
    before = [l for l in (full / "log.txt").read_text().splitlines() if int(l.split()[0]) <= 2]
    (cut / "log.txt").write_text("\n".join(before) + "\n3 train 10.8")
    expect_error(args + ["--log_dir", str(cut)], "already holds a run: pass --resume")
    capsys.readouterr()
    main(args + ["--log_dir", str(cut), "--resume"])
    assert f"--resume: no checkpoint (model_*.pt) in '{cut}' yet: starting from step 0" in capsys.readouterr().out
    assert (cut / "log.txt").read_text() == (full / "log.txt").read_text()
    assert_same_weights(full / "model_000005.pt", cut / "model_000005.pt")


# train_gpt2.py that kills itself with SIGKILL (as kill -9 would) at a chosen point: right after it logs
# `STEP STREAM`, or after writing the temporary file of the checkpoint of `save STEP`, before its rename
KILL_9 = """
import os, signal, sys, torch, logger, train_gpt2
where = sys.argv[1]
def die_after(real, here):
    def wrapper(*args):
        real(*args)
        if here(*args):
            os.kill(os.getpid(), signal.SIGKILL)
    return wrapper
logger.Logger.log = die_after(logger.Logger.log, lambda log, step, stream, *_: where == f"{step} {stream}")
torch.save = die_after(torch.save, lambda ckpt, path: where == f"save {ckpt['step']}")
train_gpt2.main(sys.argv[2:])
"""


def run_killed_at(where, args, cwd):
    """train_gpt2.py's run of args in cwd, with one thread (main_1_thread's), killed by KILL_9 at `where`."""
    (cwd / "kill_9.py").write_text(KILL_9)
    return launch([where] + args, cwd=cwd, script=cwd / "kill_9.py", env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_until_done_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "10", "--checkpoint_interval", "4",
                   "--eval_interval", "3", "--log_dir", "run"]
    (tmp_path / "full").mkdir()
    monkeypatch.chdir(tmp_path / "full")
    main_1_thread(args)  # the oracle: the same run, never killed (in this process: not about the process boundary)
    # after the first line is logged; before the first checkpoint; while writing it; after it,
    # with steps logged past it; and on the last step, after the second checkpoint
    kills = ["0 val", "2 train", "save 4", "6 val", "9 val"]
    for i, where in enumerate(kills):
        r = run_killed_at(where, args + (["--resume"] if i else []), tmp_path)
        assert r.returncode == -signal.SIGKILL, f"not killed at {where}: {r.stderr}"
        assert ("starting from step 0" in r.stdout) == (0 < i <= 3)  # no model_000004.pt until the 4th run
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main_1_thread(args + ["--resume"])  # the last run, to the end: the same code in this process
    assert "resuming at step 8" in capsys.readouterr().out
    assert (tmp_path / "run" / "log.txt").read_text() == (tmp_path / "full" / "run" / "log.txt").read_text()
    assert_same_weights(tmp_path / "full" / "run" / "model_000010.pt", tmp_path / "run" / "model_000010.pt")


@pytest.mark.slow
def test_torchrun_two_processes_and_two_nodes_match_one_process(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"  # 17 examples on rank 0, 16 on rank 1
    args = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "10", "--eval_interval", "5",
                   "--hellaswag", "--hellaswag_data", str(fixture)]  # HellaSwag split over ranks, then summed
    main_1_thread(args + ["--log_dir", str(tmp_path / "single")])  # the oracle, in this process
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    r = run_script(args + ["--log_dir", "ddp"], cwd=tmp_path,
                   launcher=torchrun + ["--standalone", "--nproc_per_node=2"])
    assert r.returncode == 0, r.stderr
    port = str(free_port())
    nodes = [subprocess.Popen(torchrun + ["--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
                                          "--master_addr=127.0.0.1", f"--master_port={port}",
                                          str(ROOT / "train_gpt2.py")] + args + ["--log_dir", "nodes"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    for p in nodes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    single = read_log(tmp_path / "single" / "log.txt", "train")
    assert len(single) == 10
    for other in ("ddp", "nodes"):
        got = read_log(tmp_path / other / "log.txt", "train")
        assert got.keys() == single.keys()
        assert max(abs(got[s] - single[s]) for s in single) <= 1e-5
        val = read_log(tmp_path / other / "log.txt", "val")
        assert max(abs(v - read_log(tmp_path / "single" / "log.txt", "val")[s]) for s, v in val.items()) <= 1e-5
        assert read_log(tmp_path / other / "log.txt", "hella") == read_log(tmp_path / "single" / "log.txt", "hella")
    assert set(read_log(tmp_path / "single" / "log.txt", "hella")) == {0, 5, 9}
    assert "accum=1" in r.stdout and "2 process(es)" in r.stdout


@pytest.mark.slow
def test_compiled_run_with_val_hellaswag_and_samples(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"
    args = TINY_COMPILED + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--eval_interval", "2",
                            "--compile", "--hellaswag", "--hellaswag_data", str(fixture), "--sample_interval", "2",
                            "--log_dir", "log"]
    r = launch(args, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "compile True" in r.stdout
    log = tmp_path / "log" / "log.txt"
    assert set(read_log(log, "hella")) == {0, 2}
    assert all(0 <= v <= 1 for v in read_log(log, "hella").values())
    assert set(read_log(log, "val")) == {0, 2}
    assert r.stdout.count("sample 0:") == 1  # step 2, the last step
    assert "HellaSwag acc_norm" in r.stdout and "/33 =" in r.stdout


# -----------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing overwritten


def expect_error(args, match):
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and match in msg, msg
    return msg


BAD_FLAGS = [
    ("max_lr", "nan"), ("max_lr", "inf"), ("max_lr", "-0.0006"), ("max_lr", "0.0"), ("min_lr", "-0.1"),
    ("min_lr", "nan"), ("min_lr", "0.5"), ("weight_decay", "-0.1"), ("weight_decay", "inf"), ("grad_clip", "-1.0"),
    ("grad_clip", "nan"), ("warmup_steps", "-5"), ("seed", "-1"), ("seed", str(2**64)), ("batch_size", "0"),
    ("seq_len", "-32"), ("total_batch_size", "0"), ("max_steps", "0"), ("eval_interval", "0"), ("val_tokens", "0"),
    ("sample_interval", "0"), ("checkpoint_interval", "-1"), ("n_layer", "0"), ("n_head", "0"), ("n_head", "3"),
    ("n_embd", "0"), ("block_size", "0"), ("vocab_size", "1000"), ("temperature", "-1.0"), ("temperature", "nan"),
    ("max_new_tokens", "-1"), ("max_new_tokens", "0"), ("top_k", "0"), ("num_samples", "0"),
    ("optimizer", "sgd"), ("muon_lr", "nan"), ("muon_lr", "-0.02"), ("muon_momentum", "1.5"),
    ("dist_timeout", "0"), ("dist_timeout", "-600"),
]


@pytest.mark.parametrize("mode", ["train", "sample", "export"])
@pytest.mark.parametrize("flag, value", BAD_FLAGS, ids=[f"{f} {v}" for f, v in BAD_FLAGS])
def test_bad_numeric_flag_is_one_line_before_anything_is_written(tmp_path, flag, value, mode):
    log = tmp_path / "log"
    run = {"train": [], "sample": ["--sample"], "export": ["--export", str(tmp_path / "hf")]}[mode]
    msg = expect_error(TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--log_dir", str(log),
                               f"--{flag}", value] + run, " it takes ")
    named = "--n_embd 32" if (flag, value) == ("n_head", "3") else f"--{flag} {value}"  # 32 heads of 3 channels?
    assert msg.startswith(f"error: {named}: it takes "), msg
    assert not log.exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args, match", [(["--seed", "x"], "--seed: invalid int value"),
                                         (["--max_steps", "1.5"], "--max_steps: invalid int value"),
                                         (["--no-such-flag"], "unrecognized arguments")])
def test_unparsable_flag_is_one_line(tmp_path, args, match):
    expect_error(["--log_dir", str(tmp_path / "log")] + args, match)
    assert not (tmp_path / "log").exists()


def test_bad_flag_on_the_command_line_exits_1_with_one_line(tmp_path):
    r = run_script(["--preset", "shakespeare", "--seed", "-1"], cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "error: --seed -1: it takes an integer from 0 to 2**64 - 1\n"
    assert not list(tmp_path.iterdir())


def test_grad_clip_0_means_no_clipping(tmp_path):
    base = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--max_lr", "1e-2", "--warmup_steps", "1"]
    for clip in ("0", "1e9", "1e-3"):
        main(base + ["--grad_clip", clip, "--log_dir", str(tmp_path / clip)])
    off, huge, tight = (read_log(tmp_path / c / "log.txt", "train") for c in ("0", "1e9", "1e-3"))
    assert off == huge and off[2] < off[0] - 0.05  # it learns, exactly as with a clip it never reaches
    assert tight != off  # and the clip, where set, does bite


def test_bad_data_is_a_clear_error(tmp_path):
    base = TINY + ["--max_steps", "2", "--log_dir", str(tmp_path / "log")]
    expect_error(base + ["--data", str(tmp_path / "nowhere")], "no train shards")
    (tmp_path / "empty").mkdir()
    expect_error(base + ["--data", str(tmp_path / "empty")], "python fineweb.py")
    expect_error(base + ["--data", str(tmp_path / "missing.txt")], "does not exist")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "x_val_000000.npy", np.arange(1000, dtype=np.int32))
    np.save(wrong / "x_train_000001.npy", np.arange(1000, dtype=np.int32))
    expect_error(base + ["--data", str(wrong)], "not 1-D uint16")
    big = tmp_path / "big"
    big.mkdir()
    np.save(big / "x_val_000000.npy", np.full(1000, 60000, dtype=np.uint16))
    np.save(big / "x_train_000001.npy", np.full(1000, 60000, dtype=np.uint16))
    expect_error(base + ["--data", str(big)], "token id 60000 >= vocab_size 50304")
    assert not (tmp_path / "log" / "log.txt").exists()


def test_bad_shapes_are_clear_errors(tmp_path):
    base = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--log_dir", str(tmp_path / "log")]
    expect_error(base + ["--seq_len", "64"], "longer than the model's block_size 32")
    msg = expect_error(base + ["--total_batch_size", "300"], "not divisible")
    assert "--total_batch_size 256" in msg
    expect_error(base + ["--device", "cuda"], "no CUDA")
    expect_error(base + ["--device", "gpu"], "not a device")
    expect_error(base + ["--dtype", "fp16"], "--dtype fp16: it takes auto, float32, bfloat16 or float16")
    expect_error(base + ["--eval_interval", "0"], "--eval_interval 0: it takes an integer >= 1")


def test_bad_resume_is_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    log = tmp_path / "log"
    base = TINY + ["--data", str(ROOT / "input.txt"), "--log_dir", str(log)]
    main(base + ["--max_steps", "2"])
    ckpt = log / "model_000002.pt"
    saved = ckpt.read_bytes()
    expect_error(base + ["--max_steps", "4"], "already holds a run")
    expect_error(base + ["--resume", "--max_steps", "4", "--n_layer", "3"], "--n_layer 3 but it has 2")
    expect_error(base + ["--resume", "--max_steps", "4", "--seed", "1"], "trained with --seed 1337")
    assert ckpt.read_bytes() == saved
    (log / "other.pt").write_bytes(saved[:1000])  # cut short (--resume skips such a one: tests/test_disk.py)
    expect_error(base[:-2] + ["--log_dir", str(tmp_path / "new"), "--init_from", str(log / "other.pt")],
                 "is corrupt or not a train_gpt2.py checkpoint")
    assert ckpt.read_bytes() == saved


def test_resume_follows_the_command_lines_hyperparameters(tmp_path, capsys):
    # optimizer.load_state_dict brings back each param group's weight_decay and lr: the flags must win
    log = tmp_path / "log"
    base = TINY + ["--data", str(ROOT / "input.txt"), "--log_dir", str(log), "--checkpoint_interval", "2"]
    main(base + ["--max_steps", "4"])
    shutil.copytree(log, tmp_path / "same")
    (log / "model_000004.pt").unlink()
    capsys.readouterr()
    main(base + ["--max_steps", "4", "--resume", "--weight_decay", "0", "--grad_clip", "0.5"])
    assert "--resume follows the command line: --weight_decay 0.0 (was 0.1), --grad_clip 0.5 (was 1.0)" in \
        capsys.readouterr().out
    groups = torch.load(log / "model_000004.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert torch.load(tmp_path / "same" / "model_000004.pt")["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    a, b = (torch.load(d / "model_000004.pt")["model"] for d in (log, tmp_path / "same"))
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"])


def test_resume_knows_its_data_by_the_files_not_the_spelling(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards", [30, 60, 60])
    log = tmp_path / "log"
    base = TINY + ["--seq_len", "16", "--log_dir", str(log), "--checkpoint_interval", "1"]
    main(base + ["--data", str(shards), "--max_steps", "1"])
    main(base + ["--data", str(shards) + "/", "--max_steps", "2", "--resume"])
    shutil.copytree(shards, tmp_path / "moved")
    main(base + ["--data", str(tmp_path / "moved"), "--max_steps", "3", "--resume"])
    os.remove(tmp_path / "moved" / "test_train_000002.npy")
    expect_error(base + ["--data", str(tmp_path / "moved"), "--max_steps", "4", "--resume"],
                 f"--data {tmp_path / 'moved'} (other files than --data {tmp_path / 'moved'} holds now)")
    # a checkpoint from before the files were recorded: its --data string, normalised
    monkeypatch.chdir(ROOT)
    txt = TINY + ["--log_dir", str(tmp_path / "txt"), "--checkpoint_interval", "1"]
    main(txt + ["--data", "input.txt", "--max_steps", "1"])
    ckpt = torch.load(tmp_path / "txt" / "model_000001.pt")
    del ckpt["data"]
    torch.save(ckpt, tmp_path / "txt" / "model_000001.pt")
    main(txt + ["--data", "./input.txt", "--max_steps", "2", "--resume"])
    assert sorted(read_log(tmp_path / "txt" / "log.txt", "train")) == [0, 1]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    log = tmp_path / "log"
    base = TINY + ["--data", str(ROOT / "input.txt"), "--log_dir", str(log)]
    main(base + ["--max_steps", "2"])
    ckpt = torch.load(log / "model_000002.pt")
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = math.nan
    torch.save(ckpt, log / "model_000002.pt")
    saved = (log / "model_000002.pt").read_bytes()
    msg = expect_error(base + ["--max_steps", "6", "--resume"], "not finite at step 2")
    assert "model_000002.pt" in msg
    assert (log / "model_000002.pt").read_bytes() == saved
    assert sorted(p.name for p in log.glob("model_*")) == ["model_000002.pt"]


def test_no_shards_and_no_gpu_says_what_to_run(tmp_path):
    r = run_script([], cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "python fineweb.py" in r.stderr


def test_hellaswag_is_skipped_with_a_note_when_unavailable(tmp_path, capsys):
    base = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "1", "--hellaswag"]
    main(base + ["--hellaswag_data", str(tmp_path / "nowhere.jsonl"), "--log_dir", str(tmp_path / "log")])
    assert "HellaSwag skipped: no HellaSwag data" in capsys.readouterr().out
    assert not read_log(tmp_path / "log" / "log.txt", "hella") and read_log(tmp_path / "log" / "log.txt", "train")


def test_trains_on_fineweb_shards(tmp_path):
    import fineweb  # its main, in this process (tests/test_fineweb.py runs the script itself)
    fineweb.main(["--input", str(ROOT / "input.txt"), "--output_dir", str(tmp_path / "shards"), "--shard_size",
                  "100000", "--num_proc", "1"])
    main(TINY + ["--data", str(tmp_path / "shards"), "--max_steps", "3", "--log_dir", str(tmp_path / "log")])
    train = read_log(tmp_path / "log" / "log.txt", "train")
    assert len(train) == 3 and all(math.isfinite(v) for v in train.values())
    # 338,025 tokens + 1 EOT: shard 0 (val) and train shards 1-3
    loader = DataLoader(sorted(str(p) for p in (tmp_path / "shards").glob("*_train_*.npy")), 32, 50304)
    assert loader.seqs_per_epoch == sum((n - 1) // 32 for n in (100000, 100000, 38026))


def test_val_loss_with_a_short_last_batch_is_the_mean_over_every_token(tmp_path):
    # 7 val sequences in batches of 3: the last batch is padded to 3 rows with ignored targets, so the compiled
    # shape never changes; the loss must still be the plain mean over the 7 sequences' tokens
    from types import SimpleNamespace
    from train_gpt2 import evaluate_val
    make_shards(tmp_path, [40])
    loader = DataLoader([str(tmp_path / "test_val_000000.npy")], 16, 50304, shuffle=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    cfg = SimpleNamespace(val_tokens=7 * 16, seq_len=16, batch_size=3)
    got = evaluate_val(model, loader, cfg, 0, 1, torch.device("cpu"), contextlib.nullcontext())
    x, y = loader.batch(range(7))
    with torch.no_grad():
        assert got == pytest.approx(model(x, y)[1].item(), abs=1e-6)


# -----------------------------------------------------------------------------
# Muon (--optimizer muon): the blocks' matrices with torch.optim.Muon, the rest with AdamW

MUON = ["--optimizer", "muon", "--muon_lr", "4e-3"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = tiny_model()
    opt = configure_optimizer(model, 0.1, 6e-4, "cpu", "muon", muon_lr=0.02, muon_split_qkv=False)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.adamw.param_groups)
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight"}  # wte is also the tied lm_head
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay)
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [0.02, 6e-4, 6e-4]
    assert opt.muon.defaults["adjust_lr_fn"] == "match_rms_adamw" and opt.muon.defaults["momentum"] == 0.95
    assert opt.muon.defaults["weight_decay"] == 0.1 and opt.muon.defaults["nesterov"]


@pytest.mark.parametrize("split", [True, False])
def test_muon_steps_equal_torch_muon_on_q_k_v_apart_or_whole(split):
    """The oracle: plain torch.optim.Muon and AdamW on a twin model, its c_attn stepped as q, k, v leaves or whole."""
    model, twin = tiny_model(), tiny_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = configure_optimizer(model, 0.1, 1e-3, "cpu", "muon", muon_lr=0.02, muon_split_qkv=split)
    ref = dict(twin.named_parameters())
    parts = {n: [t.detach().clone().requires_grad_() for t in p.detach().chunk(3)]
             for n, p in ref.items() if split and n.endswith("c_attn.weight")}
    matrices = [p for n, p in ref.items() if n.startswith("transformer.h.") and p.dim() == 2 and n not in parts]
    matrices += [t for ts in parts.values() for t in ts]
    rest = [p for n, p in ref.items() if not n.startswith("transformer.h.") or p.dim() < 2]
    ref_muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                                   {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    for _ in range(3):  # three steps, so the momentum buffers count too
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()
        twin.zero_grad(set_to_none=True)
        twin(x, y)[1].backward()
        for n, ts in parts.items():
            for t, g in zip(ts, ref[n].grad.chunk(3)):
                t.grad = g
        ref_muon.step()
        ref_adamw.step()
        with torch.no_grad():
            for n, ts in parts.items():
                ref[n].copy_(torch.cat(ts))
    for n, p in model.named_parameters():
        assert torch.allclose(p, ref[n], atol=1e-6), n
        assert not torch.equal(p, init[n]), n


def test_muon_resume_is_exact_and_the_checkpoint_holds_both_optimizers(tmp_path):
    args = TINY + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "6", "--checkpoint_interval", "3",
                          "--eval_interval", "2"]
    full = tmp_path / "full"
    main(args + ["--log_dir", str(full)])
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "model_000003.pt", cut)
    (cut / "log.txt").write_text("".join(l for l in open(full / "log.txt") if int(l.split()[0]) < 3))
    main(args + ["--log_dir", str(cut), "--resume"])
    assert read_log(cut / "log.txt", "train") == read_log(full / "log.txt", "train")
    assert read_log(cut / "log.txt", "val") == read_log(full / "log.txt", "val")
    a, b = torch.load(full / "model_000006.pt"), torch.load(cut / "model_000006.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # Muon's momentum buffers (2 layers x 4 matrices, c_attn as q, k, v: 12) and AdamW's moments are saved
    muon, adamw = a["optimizer"]["muon"], a["optimizer"]["adamw"]
    assert len(muon["state"]) == 12 and all("momentum_buffer" in s for s in muon["state"].values())
    assert all("exp_avg_sq" in s for s in adamw["state"].values()) and len(adamw["state"]) > 0
    assert a["model"].keys() == GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).state_dict().keys()


def test_muon_group_follows_the_same_schedule_from_its_own_peak(tmp_path):
    log = tmp_path / "log"
    main(TINY + ["--optimizer", "muon", "--muon_lr", "0.02", "--data", str(ROOT / "input.txt"), "--max_steps", "5",
                 "--min_lr", "1e-4", "--log_dir", str(log)])
    opt = torch.load(log / "model_000005.pt")["optimizer"]
    ratio = get_lr(4, 1e-3, 1e-4, 3, 5) / 1e-3  # the lr of the last step (4) over --max_lr
    assert opt["muon"]["param_groups"][0]["lr"] == pytest.approx(0.02 * ratio)
    assert [g["lr"] for g in opt["adamw"]["param_groups"]] == pytest.approx([1e-3 * ratio] * 2)
    assert opt["muon"]["param_groups"][0]["adjust_lr_fn"] == "match_rms_adamw"
    # the log has the same streams and formats as AdamW's
    lines = (log / "log.txt").read_text().splitlines()
    assert [l.split()[1] for l in lines] == ["tokens_per_step", "val", "train", "train", "train", "train", "val", "train"]


def test_muon_with_grad_accumulation_equals_one_big_batch(tmp_path):
    base = TINY + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--eval_interval", "3"]
    main(base + ["--batch_size", "8", "--log_dir", str(tmp_path / "big")])  # accum 1
    main(base + ["--batch_size", "2", "--log_dir", str(tmp_path / "small")])  # accum 4
    for stream in ("train", "val"):
        big, small = read_log(tmp_path / "big" / "log.txt", stream), read_log(tmp_path / "small" / "log.txt", stream)
        assert big.keys() == small.keys() and max(abs(big[s] - small[s]) for s in big) <= 1e-5


def test_muon_checkpoint_exports_to_transformers_with_identical_logits(tmp_path):
    from transformers import GPT2LMHeadModel
    from train_gpt2 import GPT2_VOCAB, load_model
    log = tmp_path / "log"
    main(TINY + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--log_dir", str(log)])
    main(["--log_dir", str(log), "--export", str(tmp_path / "hf")])
    ours = load_model(str(log / "model_000003.pt")).eval()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0][..., :GPT2_VOCAB]).abs().max().item() <= 1e-4


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    # (bad values of the Muon flags are in BAD_FLAGS)
    log = tmp_path / "log"
    base = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--log_dir", str(log)]
    main(base)
    saved = (log / "model_000002.pt").read_bytes()
    resume = base + ["--resume", "--max_steps", "4"]
    expect_error(resume + MUON, "trained with --optimizer adamw")
    assert (log / "model_000002.pt").read_bytes() == saved
    main(resume + ["--no-muon_split_qkv"])  # a Muon-only flag does not matter to an AdamW run
    muon_log = tmp_path / "muon"
    main(TINY + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "2", "--log_dir", str(muon_log)])
    again = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "4", "--log_dir", str(muon_log), "--resume"]
    expect_error(again, "trained with --optimizer muon --muon_split_qkv")
    expect_error(again + MUON + ["--no-muon_split_qkv"], "trained with --optimizer muon --muon_split_qkv")


@pytest.mark.slow
def test_muon_torchrun_two_processes_match_one_process(tmp_path):
    args = TINY + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "8", "--eval_interval", "4"]
    main_1_thread(args + ["--log_dir", str(tmp_path / "single")])  # accum 2; the oracle, in this process
    r = launch(args + ["--log_dir", "ddp"], cwd=tmp_path, ranks=2)  # accum 1 on each of 2 ranks
    assert r.returncode == 0, r.stderr
    assert "2 process(es)" in r.stdout and "accum=1" in r.stdout
    for stream in ("train", "val"):
        single, ddp = (read_log(tmp_path / d / "log.txt", stream) for d in ("single", "ddp"))
        assert single.keys() == ddp.keys() and max(abs(single[s] - ddp[s]) for s in single) <= 1e-5
    assert len(read_log(tmp_path / "single" / "log.txt", "train")) == 8


@pytest.mark.slow
def test_muon_compiled_run_matches_eager(tmp_path):
    args = TINY_COMPILED + MUON + ["--data", str(ROOT / "input.txt"), "--max_steps", "3", "--eval_interval", "2"]
    r = launch(args + ["--compile", "--log_dir", "compiled"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "compile True" in r.stdout
    main(args + ["--log_dir", str(tmp_path / "eager")])
    # compiled kernels round differently (~1e-6); val is logged to 4 decimals, so it may differ by one unit
    for stream, tol in (("train", 1e-4), ("val", 2e-4)):
        eager, compiled = (read_log(tmp_path / d / "log.txt", stream) for d in ("eager", "compiled"))
        assert eager.keys() == compiled.keys() and max(abs(eager[s] - compiled[s]) for s in eager) <= tol


def test_four_epoch_preset_spans_40b_tokens_with_one_schedule_and_a_new_order_each_epoch(tmp_path):
    one, four = (parse_args(["--preset", p])[1] for p in ("gpt2", "gpt2-4epochs"))
    assert four.max_steps == 76292 == 4 * one.max_steps and four.total_batch_size == one.total_batch_size
    assert four.max_steps * four.total_batch_size == pytest.approx(40e9, rel=1e-3)
    assert (four.data, four.warmup_steps, four.max_lr, four.shuffle) == (one.data, one.warmup_steps, one.max_lr, True)
    # the cosine runs over all four epochs: half way down at two epochs, at min_lr only at the end
    lr = lambda step: get_lr(step, four.max_lr, 0.1 * four.max_lr, four.warmup_steps, four.max_steps)
    assert lr(four.warmup_steps + (four.max_steps - four.warmup_steps) // 2) == pytest.approx(0.55 * four.max_lr,
                                                                                               rel=1e-4)
    assert lr(one.max_steps) > 0.8 * four.max_lr and lr(four.max_steps - 1) == pytest.approx(0.1 * four.max_lr,
                                                                                             rel=1e-6)
    # a new seeded order of shards and documents each epoch: no two of the four epochs read the same sequences
    loader = DataLoader(find_data(str(make_shards(tmp_path, [5, 40, 40, 40])))[0], 16, 50304, four.seed, four.shuffle)
    epochs = [[tuple(loader.sequence(e * loader.seqs_per_epoch + q)) for q in range(loader.seqs_per_epoch)]
              for e in range(4)]
    assert all(epochs[e] != epochs[f] for e in range(4) for f in range(e))
