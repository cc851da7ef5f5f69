"""
--recompute (activation checkpointing), the memory plan printed before step 0 (and --eval_only's), and
out-of-memory errors that name the fix. Oracles: the run without --recompute, the real tensors' sizes,
saved_tensors_hooks' bytes, the CPU allocator's peak under the profiler.
"""
import contextlib
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import eval_only
import hellaswag
import train_gpt2
from conftest import ROOT, launch
from test_train import TINY, expect_error, read_log
import memory_plan as plan_module
from memory_plan import eval_plan, memory_plan
from train_gpt2 import GPT, GPTConfig, TrainConfig, batch_loss, configure_optimizer, main

TINY_RUN = TINY + ["--data", str(ROOT / "input.txt")]
FIXTURE_33 = ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl"
sys.path.insert(0, str(ROOT / "bench"))
from bench_memory import kept_bytes  # noqa: E402  (the bench prints what these tests assert)


@pytest.mark.parametrize("recompute", [False, True])
def test_activation_formula_matches_what_autograd_keeps(recompute):
    measured, planned = kept_bytes(GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128), 2, 64, recompute)
    assert abs(measured - planned) <= 0.01 * planned, (measured, planned)


def test_recompute_keeps_fewer_bytes_by_at_least_the_planned_factor():
    model_cfg = GPTConfig(block_size=64, n_layer=6, n_head=4, n_embd=256)
    (measured_off, planned_off), (measured_on, planned_on) = (kept_bytes(model_cfg, 2, 64, r) for r in (False, True))
    assert measured_on < measured_off
    assert measured_off / measured_on >= 0.99 * planned_off / planned_on and planned_off / planned_on > 1.2


def test_recompute_trains_exactly_as_without(tmp_path):
    args = TINY_RUN + ["--max_steps", "5", "--eval_interval", "2"]
    main(args + ["--log_dir", str(tmp_path / "plain")])
    main(args + ["--log_dir", str(tmp_path / "recompute"), "--recompute"])
    for stream in ("train", "val"):
        a, b = (read_log(tmp_path / d / "log.txt", stream) for d in ("plain", "recompute"))
        assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a) <= 1e-6
    a, b = (torch.load(tmp_path / d / "model_000005.pt")["model"] for d in ("plain", "recompute"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same keys: no wrapper


def peak_saved_bytes(fn):
    """The most bytes autograd held for backward at any one time while fn() ran (parameters aside)."""
    live, peak = [0], [0]

    class Saved:
        def __init__(self, t):
            # detached: an op's saved output, kept with its grad_fn, would make a cycle that frees nothing
            self.t, self.n = t.detach(), 0 if isinstance(t, torch.nn.Parameter) else t.untyped_storage().nbytes()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
        fn()
    return peak[0]


def test_val_holds_one_batchs_graph_at_a_time():
    # val runs the step's graph with autograd on (no second compile): each batch's graph must be gone before the
    # next batch's forward, or a val of many batches holds twice what the memory plan gives one micro-batch
    from types import SimpleNamespace
    from train_gpt2 import DataLoader, evaluate_val
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    tokens = np.random.default_rng(0).integers(0, 50257, 4096).astype(np.uint16)
    loader = DataLoader([tokens], 32, 50304, shuffle=False)
    peak = {n: peak_saved_bytes(lambda: evaluate_val(model, loader, SimpleNamespace(
        val_tokens=n * 2 * 32, seq_len=32, batch_size=2), 0, 1, torch.device("cpu"), contextlib.nullcontext()))
        for n in (1, 4)}
    one_step = peak_saved_bytes(lambda: model(*loader.batch(range(2))))
    assert abs(peak[1] - one_step) <= 0.01 * one_step  # the padded targets' few bytes aside
    assert peak[4] <= 1.01 * peak[1], peak  # 2x before val freed each batch's graph before the next forward


def allocation_peak(fn):
    """The most bytes fn() held allocated at once, beyond what was live before: the CPU allocator's own
    allocations and frees, in the order the profiler saw them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def events(nodes):
        for e in nodes:
            yield e
            yield from events(e.children)
    allocations = sorted((e for e in events(prof.profiler.kineto_results.experimental_event_tree())
                          if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    live = peak = 0
    for e in allocations:
        live += e.extra_fields.alloc_size  # negative for a free
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [dict(n_embd=64, vocab_size=4096), dict(n_embd=256, vocab_size=256)])
def test_eval_plan_matches_the_allocators_peak_of_its_no_grad_forwards(shape, dtype):
    # the logits dominate (as in GPT-2, where V = 65 C), or a block's MLP does
    model_cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, **shape)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    half = dtype == "bfloat16"
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=half)
    ids = lambda rows, T: torch.randint(0, 256, (rows, T))
    mask = torch.ones(64, 32).long()
    scored = lambda: hellaswag.ending_losses(model, ids(64, 32), mask, torch.bfloat16 if half else None)
    val = eval_plan(model_cfg, TrainConfig(batch_size=8, seq_len=64), dtype, 0)
    hella = eval_plan(model_cfg, TrainConfig(batch_size=1, seq_len=1), dtype, 32)  # 64 rows of 32 tokens
    assert "val's forward" in val and "HellaSwag's forward" in hella
    with torch.no_grad():  # as eval_only runs evaluate_val's batch_loss; HellaSwag's with every token scored
        measured = [allocation_peak(lambda: batch_loss(model, ids(8, 64), ids(8, 64), autocast)),
                    allocation_peak(scored)]
    for plan, got in zip((val, hella), measured):
        planned = sum(plan.values()) - plan["parameters"]  # the weights were allocated before
        # less than planned where a block's MLP peaks before autocast copied the later weights (the plan
        # counts all of them), or HellaSwag's loss after its autocast freed them
        assert 0.93 * planned <= got <= 1.01 * planned, (plan, got)


@pytest.mark.slow
def test_recompute_under_compile_ddp_and_fsdp_matches_the_plain_run(tmp_path):
    args = TINY_RUN + ["--max_steps", "3", "--eval_interval", "2", "--total_batch_size", "512"]
    main(args + ["--log_dir", str(tmp_path / "plain")])
    for name, flags, ranks in (("compiled", ["--compile"], None), ("ddp", [], 2), ("fsdp", ["--fsdp"], 2)):
        r = launch(args + ["--recompute", "--log_dir", name] + flags, cwd=tmp_path, ranks=ranks, timeout=900)
        assert r.returncode == 0, r.stderr
        tol = 1e-4 if name == "compiled" else 1e-5  # compiled kernels round differently
        for stream in ("train", "val"):
            a, b = (read_log(tmp_path / d / "log.txt", stream) for d in ("plain", name))
            assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a) <= tol + 1e-4 * (stream == "val"), name


def state_bytes(tensors):
    local = lambda t: t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def optimizer_tensors(optimizer):
    state = optimizer.state_dict()
    inner = [state["muon"], state["adamw"]] if "muon" in state else [state]
    return [v for s in inner for per_param in s["state"].values() for v in per_param.values()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_plan_counts_the_parameters_gradients_and_optimizer_state_exactly(optimizer):
    model_cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg = TrainConfig(batch_size=2, seq_len=32, optimizer=optimizer)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    opt = configure_optimizer(model, 0.1, 1e-3, "cpu", optimizer)
    x = torch.randint(0, 50257, (2, 32))
    model(x, x)[1].backward()
    opt.step()
    plan = memory_plan(model_cfg, cfg, 1, "float32", None, 1)
    assert plan["parameters"] == state_bytes(model.parameters())
    assert plan["gradients"] == state_bytes(p.grad for p in model.parameters())
    assert plan["optimizer state"] == state_bytes(optimizer_tensors(opt))
    ddp = memory_plan(model_cfg, cfg, 2, "float32", "ddp", 1)  # DDP: the same tensors on each rank, plus its buckets
    assert ddp["optimizer state"] == plan["optimizer state"] and ddp["DDP's gradient buckets"] == plan["gradients"]


FSDP_STATE = """
import sys, torch, torch.distributed as dist
from memory_plan import memory_plan
from train_gpt2 import GPT, GPTConfig, TrainConfig, configure_optimizer, wrap_model
from test_memory import optimizer_tensors, state_bytes
dist.init_process_group("gloo")
model_cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=50305)  # a row count odd on purpose
torch.manual_seed(0)
model = GPT(model_cfg)
wrap_model(model, "fsdp", False, "float32", torch.device("cpu"))
opt = configure_optimizer(model, 0.1, 1e-3, "cpu")
x = torch.randint(0, 50257, (2, 32))
model(x, x)[1].backward()
opt.step()
plan = memory_plan(model_cfg, TrainConfig(batch_size=2, seq_len=32), 2, "float32", "fsdp", 1)
real = [state_bytes(model.parameters()), state_bytes(p.grad for p in model.parameters()), state_bytes(optimizer_tensors(opt))]
if dist.get_rank() == 0:
    print("PLAN", plan["parameters"], plan["gradients"], plan["optimizer state"])
    print("REAL", *real)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_plan_counts_rank_0s_fsdp_shards_exactly(tmp_path):
    script = tmp_path / "fsdp_state.py"
    script.write_text(FSDP_STATE)
    r = launch([], cwd=tmp_path, ranks=2, script=script)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith(("PLAN", "REAL"))}
    assert lines["PLAN"] == lines["REAL"], r.stdout


@pytest.fixture
def small_gpu(monkeypatch):
    """A GPU with 4 GiB free, as far as the memory check can tell (set_device is recorded, not called)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an H100, as far
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # as precision and
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")  # compile ask
    # a CUDA run sets TF32 matmuls, for good: not for the tests after this one
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def test_a_run_that_cannot_fit_stops_before_step_0_with_the_fix(small_gpu, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    # 12 layers of width 768 at B=16, T=256: ~6 GiB by the plan; B=1 fits in 4 GiB
    args = ["--data", str(ROOT / "input.txt"), "--device", "cuda", "--batch_size", "16", "--seq_len", "256",
            "--total_batch_size", "4096", "--no-hellaswag", "--log_dir", str(log)]
    msg = expect_error(args, "per GPU, cuda:0 has 4.0 GiB free: use --batch_size ")
    assert "--no-memory_check runs anyway" in msg
    b = int(msg.split("use --batch_size ")[1].split()[0])
    assert 16 % b == 0 and b < 16  # accumulation can fill the step with it
    model_cfg, cfg, _, _ = train_gpt2.parse_args(args)
    fits = lambda b: sum(memory_plan(model_cfg, replace(cfg, batch_size=b), 1, "bfloat16", None, 1).values()) <= 4 * 2**30
    assert fits(b) and not fits(2 * b)  # the largest: the next divisor of 16 does not fit
    assert "memory plan per GPU:" in capsys.readouterr().out
    assert not log.exists()  # nothing written
    # 1 GiB free: 124M's weights, gradients and AdamW state (2 GiB) alone do not fit, so the next levers
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    msg = expect_error(args, "--fsdp")
    assert "--recompute" in msg and not log.exists()


def test_the_plans_suggestions_are_planned_with_their_own_accumulation(small_gpu, monkeypatch):
    # a smaller micro-batch means more micro-steps, and under FSDP whole gradients kept while accumulating
    model_cfg, cfg, _, _ = train_gpt2.parse_args(["--batch_size", "16", "--seq_len", "256", "--total_batch_size",
                                                  "4096", "--fsdp", "--device", "cuda"])
    seen, real = [], plan_module.memory_plan
    monkeypatch.setattr(plan_module, "memory_plan", lambda m, c, w, d, p, accum: seen.append((c.batch_size, accum))
                        or real(m, c, w, d, p, accum))
    with pytest.raises(train_gpt2.UsageError, match="use --batch_size"):
        plan_module.check_memory(model_cfg, cfg, 1, "bfloat16", "fsdp", 1, torch.device("cuda", 0), False)
    assert seen[0] == (16, 1) and len(seen) > 2 and all(accum == 16 // b for b, accum in seen[1:]), seen


def test_out_of_memory_advice_names_each_fix_once():
    for b in (1, 8):
        advice = plan_module.out_of_memory_advice("CUDA out of memory.", TrainConfig(batch_size=b))
        assert advice.count("--recompute") == 1 and advice.count("--fsdp") == 1, advice
        assert ("--batch_size 4" in advice) == (b == 8)


def tiny_checkpoint(folder):
    model_cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.save({"model": GPT(model_cfg).state_dict(), "config": asdict(model_cfg)}, folder / "tiny.pt")
    return model_cfg, folder / "tiny.pt"


def test_eval_only_that_cannot_fit_stops_before_the_model_moves_with_the_fix(small_gpu, tmp_path, capsys,
                                                                              monkeypatch):
    model_cfg, ckpt = tiny_checkpoint(tmp_path)
    args = ["--eval_only", "--init_from", str(ckpt), "--data", str(ROOT / "input.txt"), "--device", "cuda",
            "--seq_len", "32", "--batch_size", "8"]
    cfg = train_gpt2.parse_args(args)[1]
    planned = lambda b: sum(eval_plan(model_cfg, replace(cfg, batch_size=b), "bfloat16", 0).values())
    free = lambda n: monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (n, 80 * 2**30))
    # each stop comes before the model moves: on this CPU-only torch, a move to cuda would fail another way
    hella = ["--hellaswag_data", str(FIXTURE_33)]  # its 64 rows of 32 tokens outweigh val's 8 x 32
    for room, flags, fix in [(planned(3), ["--no-hellaswag"], "use --batch_size 3"),
                             (planned(8), hella, "add --no-hellaswag"),
                             (planned(3), hella, "add --no-hellaswag with --batch_size 3"),
                             (planned(1) - 1, ["--no-hellaswag"], "--batch_size 1 does not fit either: "
                              "evaluate on a GPU with more free memory, or --device cpu")]:
        free(room)
        msg = expect_error(args + flags, "per GPU, cuda:0 has ")
        assert msg.endswith(f"free: {fix}; --no-memory_check runs anyway"), msg
        assert "memory plan per GPU (--eval_only)" in capsys.readouterr().out
    assert plan_module.check_eval_memory(model_cfg, replace(cfg, memory_check=False), "bfloat16", 0,
                                         torch.device("cuda", 0), False) == planned(8)


def test_out_of_memory_advice_under_eval_only_names_only_the_flags_it_reads():
    for b, hella in ((8, True), (8, False), (1, True), (1, False)):
        cfg = TrainConfig(eval_only=True, batch_size=b, hellaswag=hella)
        advice = plan_module.out_of_memory_advice("CUDA out of memory.", cfg)
        assert ("--batch_size 4" in advice) == (b == 8) and ("--no-hellaswag" in advice) == hella, advice
        assert not any(w in advice for w in ("--recompute", "--fsdp", "total_batch", "checkpoint")), advice
        assert ("more free memory" in advice) == (b == 1 and not hella), advice


def test_out_of_memory_in_eval_only_names_its_fix(tmp_path, monkeypatch):
    _, ckpt = tiny_checkpoint(tmp_path)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                     "capacity of 79.10 GiB of which 1.50 GiB is free. Including ...")
    monkeypatch.setattr(eval_only, "evaluate_val", oom)
    args = ["--eval_only", "--init_from", str(ckpt), "--data", str(ROOT / "input.txt"), "--seq_len", "32",
            "--batch_size", "4", "--no-hellaswag"]
    msg = expect_error(args, "out of memory (asked for 2.00 GiB with ")
    assert msg.endswith("1.50 GiB free): try --batch_size 2"), msg


def test_out_of_memory_in_a_step_names_the_fix_and_keeps_the_checkpoint_and_log(tmp_path, monkeypatch):
    log = tmp_path / "log"
    args = TINY_RUN + ["--max_steps", "6", "--checkpoint_interval", "2", "--log_dir", str(log)]
    real = train_gpt2.accumulate_gradients
    calls = []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # step 3, after the step-2 checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.10 GiB of which 1.50 GiB is free. Including non-PyTorch ...")
        return real(*a, **kw)
    monkeypatch.setattr(train_gpt2, "accumulate_gradients", step)
    msg = expect_error(args, "out of memory (asked for 2.00 GiB with 1.50 GiB free): try --batch_size 2")
    assert "the last checkpoint and log.txt are intact" in msg
    assert sorted(p.name for p in log.iterdir()) == ["log.txt", "model_000002.pt"]
    lines = (log / "log.txt").read_text()
    assert lines.endswith("\n") and max(int(l.split()[0]) for l in lines.splitlines()) == 2
    monkeypatch.setattr(train_gpt2, "accumulate_gradients", real)
    main(args + ["--resume"])  # and the run goes on from there
    assert sorted(read_log(log / "log.txt", "train")) == list(range(6))


def test_a_checkpoint_too_big_for_memory_says_so(tmp_path, monkeypatch):
    log = tmp_path / "log"
    main(TINY_RUN + ["--max_steps", "1", "--log_dir", str(log)])

    def no_memory(*a, **kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 19000000000 bytes.")
    monkeypatch.setattr(torch, "load", no_memory)
    expect_error(TINY_RUN + ["--max_steps", "2", "--log_dir", str(log), "--resume"], "does not fit in this machine's")
    expect_error(["--init_from", str(log / "model_000001.pt"), "--sample"], "does not fit in this machine's")


def test_log_dir_that_is_a_file_and_a_missing_init_from_checkpoint_are_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    expect_error(TINY_RUN + ["--log_dir", str(tmp_path / "file")], "--log_dir")
    assert (tmp_path / "file").read_text() == "not a folder"
    expect_error(TINY_RUN + ["--init_from", str(tmp_path / "nope.pt"), "--log_dir", str(tmp_path / "l")],
                 f"checkpoint '{tmp_path / 'nope.pt'}' does not exist")
    expect_error(["--init_from", str(tmp_path / "nope.pt"), "--sample"], "does not exist")
