"""
Precision from what the device can do (--dtype auto/float16, the GradScaler, skipped steps), compile gated on
what inductor needs, and the per-dtype MFU peaks. fp16 autocast on a CPU is emulated (~1 s per tiny step here),
so the fp16 runs are a few steps of test_train.py's TINY model; the GPU decisions are tested with CUDA faked.
"""
import contextlib
import copy
import shutil
import sys
import types

import pytest
import torch

import hellaswag
import train_gpt2
from conftest import ROOT
from test_train import TINY, expect_error, read_log
from devices import peak_flops, peak_flops_of, resolve_compile, resolve_precision
from train_gpt2 import GPT, GPTConfig, UsageError, accumulate_gradients, configure_optimizer, main, optimizer_step

DATA = ["--data", str(ROOT / "input.txt")]
CPU = torch.device("cpu")


def ckpt(path):
    return torch.load(path)


# -----------------------------------------------------------------------------
# fp16 training on the CPU: the oracle is the fp32 run, and the uninterrupted run for resume


def test_float16_trains_within_fp16_noise_of_float32_and_resumes_exactly(tmp_path):
    args = TINY + DATA + ["--max_steps", "4", "--checkpoint_interval", "2", "--eval_interval", "2",
                          "--val_tokens", "128"]
    main(args + ["--log_dir", str(tmp_path / "fp32")])
    fp16 = args + ["--dtype", "float16"]
    main(fp16 + ["--log_dir", str(tmp_path / "full")])
    a, b = (read_log(tmp_path / d / "log.txt", "train") for d in ("fp32", "full"))
    assert a.keys() == b.keys() == set(range(4))
    # fp16 rounds the matmuls' inputs to 11 bits: measured differences ~1e-5 at width 32; the bound leaves room for
    # their growth over the steps, and the inequality shows the run really took the fp16 path
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-3 and a != b
    assert read_log(tmp_path / "full" / "log.txt", "skipped") == {}  # nothing overflowed: no step skipped
    # killed after the step-2 checkpoint: its log lines before step 2 and the checkpoint, in a new folder
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "full" / "model_000002.pt", cut)
    (cut / "log.txt").write_text("".join(l for l in open(tmp_path / "full" / "log.txt") if int(l.split()[0]) < 2))
    main(fp16 + ["--log_dir", str(cut), "--resume"])
    assert (cut / "log.txt").read_text() == (tmp_path / "full" / "log.txt").read_text()
    full, resumed = ckpt(tmp_path / "full" / "model_000004.pt"), ckpt(cut / "model_000004.pt")
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    # the scaler's state is in the checkpoint and carried over: 4 clean steps counted towards its next growth (a
    # fresh scaler on resume would count 2)
    assert ckpt(tmp_path / "full" / "model_000002.pt")["scaler"]["_growth_tracker"] == 2
    assert full["scaler"] == resumed["scaler"] and full["scaler"]["scale"] == 2.0 ** 16
    assert full["scaler"]["_growth_tracker"] == 4
    assert "scaler" not in ckpt(tmp_path / "fp32" / "model_000004.pt")


def plant_inf_in_a_gradient(monkeypatch, at_call):
    """accumulate_gradients as the loop calls it, with +inf put into one gradient after its `at_call`th call
    (0-based); returns the list of calls so far, to clear for another run."""
    real, calls = train_gpt2.accumulate_gradients, []

    def planted(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        if len(calls) == at_call:
            next(model.parameters()).grad[0, 0] = float("inf")
        calls.append(1)
        return loss

    monkeypatch.setattr(train_gpt2, "accumulate_gradients", planted)
    return calls


def test_an_overflowing_step_is_skipped_logged_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    args = TINY + DATA + ["--max_steps", "4", "--checkpoint_interval", "1", "--eval_interval", "100"]
    calls = plant_inf_in_a_gradient(monkeypatch, at_call=1)  # step 1
    main(args + ["--dtype", "float16", "--log_dir", str(tmp_path / "fp16")])
    out = capsys.readouterr().out
    log = tmp_path / "fp16" / "log.txt"
    assert read_log(log, "skipped") == {1: 1} and "1 skipped 1\n" in log.read_text()
    assert sorted(read_log(log, "train")) == [0, 1, 2, 3]  # it went on
    step_1 = next(l for l in out.splitlines() if l.startswith("step     1 | loss"))
    assert "skipped: inf/nan fp16 gradients" in step_1 and "norm inf" in step_1
    assert "1 of steps 0-3 skipped for inf/nan fp16 gradients (loss scale now 32768)" in out
    # step 1 changed nothing: its checkpoint (model_000002) holds step 0's weights and optimizer state; the scale
    # was halved; and the next step did change the weights
    before, after, next_ = (ckpt(tmp_path / "fp16" / f"model_00000{i}.pt") for i in (1, 2, 3))
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert same(before["optimizer"]["state"], after["optimizer"]["state"])  # (the lr in param_groups moves on)
    assert (before["scaler"]["scale"], after["scaler"]["scale"]) == (2.0 ** 16, 2.0 ** 15)
    assert not torch.equal(after["model"]["transformer.h.0.mlp.c_fc.weight"], next_["model"]["transformer.h.0.mlp.c_fc.weight"])
    # the same gradient without a scaler is divergence: the run stops, as it always did
    calls.clear()
    expect_error(args + ["--log_dir", str(tmp_path / "fp32")], "grad norm inf is not finite at step 1")


def test_an_fsdp_checkpoint_before_any_clean_fp16_step_resumes_exactly(tmp_path, monkeypatch):
    # --fsdp in one process; step 0 overflows, so the step-1 checkpoint holds no optimizer state: resumed, the
    # optimizer starts without state too (DCP's loader would give it zero moments at step 1 first)
    args = TINY + DATA + ["--max_steps", "3", "--checkpoint_interval", "1", "--eval_interval", "100",
                          "--val_tokens", "128", "--dtype", "float16", "--fsdp"]
    plant_inf_in_a_gradient(monkeypatch, at_call=0)  # the full run's step 0 only
    full = tmp_path / "full"
    main(args + ["--log_dir", str(full)])
    assert read_log(full / "log.txt", "skipped") == {0: 1} and ckpt(full / "model_000001.pt")["optimizer"]["state"] == {}
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "model_000001.pt", cut)
    (cut / "log.txt").write_text("".join(l for l in open(full / "log.txt") if int(l.split()[0]) < 1))
    main(args + ["--log_dir", str(cut), "--resume"])
    assert (cut / "log.txt").read_text() == (full / "log.txt").read_text()
    a, b = ckpt(full / "model_000003.pt"), ckpt(cut / "model_000003.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_muon_with_float16_trains_within_fp16_noise_of_float32(tmp_path):
    args = TINY + DATA + ["--optimizer", "muon", "--muon_lr", "4e-3", "--max_steps", "2", "--eval_interval", "100",
                          "--val_tokens", "128"]
    main(args + ["--log_dir", str(tmp_path / "fp32")])
    main(args + ["--dtype", "float16", "--log_dir", str(tmp_path / "fp16")])
    a, b = (read_log(tmp_path / d / "log.txt", "train") for d in ("fp32", "fp16"))
    assert a.keys() == b.keys() == {0, 1} and max(abs(a[s] - b[s]) for s in a) <= 1e-3 and a != b
    assert "muon" in ckpt(tmp_path / "fp16" / "model_000002.pt")["optimizer"]


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_fsdp_gathers_fp16_weights_and_the_scaler_steps_its_sharded_gradients(tmp_path):
    # --fsdp without torchrun: a process group of one. FSDP2 gathers fp16 weights (its MixedPrecisionPolicy) and
    # keeps the residual stream in fp16, where autocast alone keeps both fp32: close, not equal; and GradScaler
    # unscales and checks FSDP2's DTensor gradients
    args = TINY + DATA + ["--max_steps", "2", "--eval_interval", "100", "--val_tokens", "128", "--dtype", "float16"]
    main(args + ["--log_dir", str(tmp_path / "autocast")])
    main(args + ["--log_dir", str(tmp_path / "fsdp"), "--fsdp"])
    a, b = (read_log(tmp_path / d / "log.txt", "train") for d in ("autocast", "fsdp"))
    assert a.keys() == b.keys() == {0, 1} and max(abs(a[s] - b[s]) for s in a) <= 5e-3 and a != b
    state = ckpt(tmp_path / "fsdp" / "model_000002.pt")
    assert {v.dtype for v in state["model"].values()} == {torch.float32} and state["scaler"]["_growth_tracker"] == 2


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_scaled_step_in_fp32_equals_the_plain_step_exactly(optimizer):
    # The oracle: the same steps without a scaler. In fp32 math a power-of-two loss scale is exact, so once
    # unscale_ has reached every gradient (for Muon, c_attn's through its q, k, v views) the clip, the norm and
    # the update must be bit-identical; a gradient left scaled would change the norm and the clip.
    x, y = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1)), torch.randint(0, 64, (4, 16))
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        model = tiny_model()
        opt = configure_optimizer(model, 0.1, 1e-3, "cpu", optimizer, muon_lr=0.02)
        norms = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, [(x[:2], y[:2]), (x[2:], y[2:])], contextlib.nullcontext(),
                                        scaler=scaler)
            norms.append(optimizer_step(opt, model.parameters(), 0.5, loss, scaler)[0].item())  # a clip that bites
        runs.append((norms, model.state_dict()))
    (plain_norms, plain), (scaled_norms, scaled) = runs
    assert plain_norms == scaled_norms and min(plain_norms) > 0.5
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_with_an_inf_gradient_changes_nothing_but_the_scale(optimizer):
    model = tiny_model()
    opt = configure_optimizer(model, 0.1, 1e-3, "cpu", optimizer, muon_lr=0.02)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    loss = accumulate_gradients(model, [(x, y)], contextlib.nullcontext(), scaler=scaler)
    optimizer_step(opt, model.parameters(), 1.0, loss, scaler)  # a clean step: the optimizer has state now
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, [(x, y)], contextlib.nullcontext(), scaler=scaler)
    model.transformer.h[1].attn.c_attn.weight.grad[0, 0] = float("nan")  # Muon's, through its q view
    assert not torch.isfinite(optimizer_step(opt, model.parameters(), 1.0, loss, scaler)[0])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert same(opt.state_dict(), state)  # moments, momentum buffers and step counts untouched
    assert scaler.get_scale() == 2.0 ** 15


def test_a_non_finite_loss_stops_the_run_under_float16_too(tmp_path):
    # (test_train.py has the fp32 case): inf/nan gradients are routine with a scaler, a non-finite loss is not
    log = tmp_path / "log"
    base = TINY + DATA + ["--log_dir", str(log), "--dtype", "float16", "--eval_interval", "100"]
    main(base + ["--max_steps", "1"])
    state = ckpt(log / "model_000001.pt")
    state["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, log / "model_000001.pt")
    msg = expect_error(base + ["--max_steps", "3", "--resume"], "loss nan / grad norm nan is not finite at step 1")
    assert "model_000001.pt" in msg and not (log / "model_000002.pt").exists()


# -----------------------------------------------------------------------------
# what a GPU gets: CUDA faked, as tests/test_devices.py does


GPUS = {  # torch.cuda.get_device_name, get_device_capability, is_bf16_supported(including_emulation=False)
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), True),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), True),
    "T4": ("Tesla T4", (7, 5), False),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), False),
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), False),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, triton=True): one GPU of GPUS as far as torch.cuda's queries and `import triton` tell."""
    def make(name, triton=True):
        device_name, capability, bf16 = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: device_name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        # bf16 emulated is "supported" only when emulation counts: the resolver must ask for native support
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton") if triton else None)
        return torch.device("cuda", 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return make


def picks(dtype_arg, device):
    p = resolve_precision(dtype_arg, device)
    return p.dtype, p.scaler


@pytest.mark.parametrize("gpu, dtype, scaler, compiles", [("H100", "bfloat16", False, True),
                                                          ("A100", "bfloat16", False, True),
                                                          ("T4", "float16", True, True),
                                                          ("V100", "float16", True, True),
                                                          ("P100", "float16", True, False)])
def test_auto_picks_what_the_gpu_has_tensor_cores_for(fake_gpu, gpu, dtype, scaler, compiles):
    device = fake_gpu(gpu)
    p = resolve_precision("auto", device)
    assert (p.dtype, p.scaler, p.autocast_dtype) == (dtype, scaler, getattr(torch, dtype))
    assert GPUS[gpu][0] in p.reason and ("has bf16 tensor cores" if dtype == "bfloat16" else "no bf16") in p.reason
    use, note = resolve_compile(None, device)
    assert use == compiles and (note == "" if compiles else "compute capability >= 7.0" in note)
    # an explicit dtype is taken as given; bf16 on a card without it runs emulated, and the reason says so
    assert picks("float32", device) == ("float32", False) and picks("float16", device) == ("float16", True)
    assert resolve_precision("bfloat16", device).scaler is False
    assert ("emulated" in resolve_precision("bfloat16", device).reason) == (dtype == "float16")


def test_compile_needs_triton_and_compute_capability_7(fake_gpu):
    device = fake_gpu("H100", triton=False)
    assert resolve_compile(None, device) == (False, "Triton is not installed")
    assert resolve_compile(False, device) == (False, "")
    with pytest.raises(UsageError, match="--compile cannot run here: Triton is not installed; pass --no-compile"):
        resolve_compile(True, device)
    device = fake_gpu("P100", triton=False)
    with pytest.raises(UsageError) as e:
        resolve_compile(True, device)
    assert "\n" not in str(e.value) and "Triton is not installed and Triton needs compute capability >= 7.0, " \
                                        "Tesla P100-PCIE-16GB (compute capability 6.0) is older" in str(e.value)
    device = fake_gpu("T4")
    assert resolve_compile(None, device) == (True, "") and resolve_compile(True, device) == (True, "")


def test_the_cpu_keeps_float32_and_compile_off_by_default():
    assert picks("auto", CPU) == ("float32", False) and resolve_precision("auto", CPU).autocast_dtype is None
    assert picks("float16", CPU) == ("float16", True) and picks("bfloat16", CPU) == ("bfloat16", False)
    assert resolve_compile(None, CPU) == (False, "off by default on cpu") and resolve_compile(True, CPU) == (True, "")


def test_compile_on_an_old_gpu_is_one_line_before_anything_is_written(fake_gpu, tmp_path):
    fake_gpu("P100")
    log = tmp_path / "log"
    expect_error(TINY + DATA + ["--log_dir", str(log), "--device", "cuda", "--compile"],
                 "--compile cannot run here: Triton needs compute capability >= 7.0")
    assert not log.exists()


def test_sampling_and_hellaswag_take_the_resolved_dtype(fake_gpu, monkeypatch):
    # the entry points on a T4, up to the model's first use: sampling casts the weights to fp16; hellaswag.py
    # scores in float32 unless asked for --dtype auto, which autocasts to fp16 (both bf16 on every GPU before)
    fake_gpu("T4")
    seen = []
    monkeypatch.setattr(train_gpt2, "load_model", lambda source, device: tiny_model())
    monkeypatch.setattr(hellaswag, "load_model", lambda source, device: tiny_model())

    def stop(model, *args, **kwargs):
        seen.append(kwargs.get("autocast_dtype", next(model.parameters()).dtype))
        raise UsageError("stop: the dtype is all this test needs")

    monkeypatch.setattr(train_gpt2, "sample_text", stop)
    monkeypatch.setattr(hellaswag, "evaluate", stop)
    for dtype in ("auto", "float32"):
        with pytest.raises(SystemExit, match="stop"):
            main(["--init_from", "model.pt", "--sample", "--dtype", dtype])
    for dtype in ("float32", "auto"):
        monkeypatch.setattr(sys, "argv", ["hellaswag.py", "-m", "model.pt", "-d", "cuda", "--dtype", dtype,
                                          "--data", str(ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl")])
        with pytest.raises(SystemExit, match="stop"):
            hellaswag.main()
    assert seen == [torch.float16, torch.float32, None, torch.float16]


# -----------------------------------------------------------------------------
# MFU peaks


@pytest.mark.parametrize("name, bf16, fp16", [
    ("NVIDIA H100 80GB HBM3", 989e12, 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12, 756e12),
    ("NVIDIA H100 NVL", 836e12, 836e12),
    ("NVIDIA H200", 989e12, 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 312e12),
    ("NVIDIA A10", 125e12, 125e12),
    ("NVIDIA A10G", 70e12, 70e12),
    ("NVIDIA RTX A6000", 154.8e12, 154.8e12),
    ("NVIDIA L4", 121e12, 121e12),
    ("NVIDIA L40S", 362e12, 362e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 165.2e12),
    ("NVIDIA GeForce RTX 4080", 97.5e12, 97.5e12),
    ("NVIDIA GeForce RTX 3090", 71e12, 71e12),
    ("NVIDIA GeForce RTX 3080", 59.5e12, 59.5e12),
    ("NVIDIA GeForce RTX 2080 Ti", None, 53.8e12),
    ("Tesla T4", None, 65e12),
    ("Tesla V100-SXM2-16GB", None, 125e12),
    ("Tesla V100-PCIE-32GB", None, 112e12),
    ("Tesla V100S-PCIE-32GB", None, 130e12),
    ("Tesla P100-PCIE-16GB", None, None),  # no tensor cores: no MFU
    ("NVIDIA GeForce GTX 1080 Ti", None, None),
    ("AMD Instinct MI300X", 1307.4e12, 1307.4e12),
    ("AMD Instinct MI325X", 1307.4e12, 1307.4e12),
    ("AMD Instinct MI250X/MI250", 191.5e12, 191.5e12),  # one of its two GCDs, each a torch device
])
def test_peak_flops_per_dtype_from_real_device_names(name, bf16, fp16):
    peaks = peak_flops_of(name)
    assert (peaks.get("bfloat16"), peaks.get("float16")) == (bf16, fp16)


def test_amd_float32_peaks_are_tf32_on_mi300_and_fp32_matrix_on_mi250x():
    # torch takes MI300's TF32 for float32 matmuls under set_float32_matmul_precision("high"); CDNA 2 has none
    assert peak_flops_of("AMD Instinct MI300X")["float32"] == peak_flops_of("AMD Instinct MI325X")["float32"] \
        == 653.7e12
    assert peak_flops_of("AMD Instinct MI250X/MI250")["float32"] == 95.7e12 / 2


def test_mfu_divides_by_the_peak_of_the_dtype_in_use(fake_gpu):
    device = fake_gpu("T4")
    assert peak_flops(device, resolve_precision("auto", device).dtype) == 65e12
    assert peak_flops(device, "bfloat16") is None and peak_flops(device, "float32") == 8.1e12
    device = fake_gpu("A100")
    assert peak_flops(device, "bfloat16") == 312e12 and peak_flops(device, "float32") == 156e12  # TF32
    assert peak_flops(CPU, "float32") is None
