"""
The GPU paths, checked on a machine without a GPU: CUDA (and ROCm, and a GPU box whose GPUs torch cannot see) is
faked where the code only asks torch about it, and bench/gpu_check.py, which a GPU session runs for real, runs
here on the CPU with a tiny model so it cannot rot.
"""
import contextlib
import functools
import re
import shutil
import sys
import types
import warnings

import pytest
import torch
import torch.distributed as dist
from transformers import GPT2LMHeadModel

import devices
import hellaswag
import train_gpt2
from conftest import ROOT, launch, run_main
from devices import peak_flops, resolve_device, resolve_precision
from test_train import TINY
from train_gpt2 import GPT, GPTConfig, UsageError, main, setup_distributed


@pytest.fixture
def fake_cuda(monkeypatch):
    """
    A machine with 2 GPUs, as far as device selection can tell. torch.cuda.set_device keeps its real argument
    check, which rejects a device without an index (what crashed `python train_gpt2.py` on one H200), and
    records the index it was given instead of calling the driver.
    """
    given = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: given.append(torch.cuda._utils._get_device_index(d)))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return given


def test_cuda_means_an_indexed_gpu_with_and_without_torchrun(fake_cuda, monkeypatch):
    for arg in ("auto", "cuda", "cuda:0"):
        assert setup_distributed(arg) == (False, 0, 1, torch.device("cuda", 0))
    assert setup_distributed("cuda:1")[3] == torch.device("cuda", 1)
    # under torchrun each process takes GPU LOCAL_RANK and the process group talks NCCL
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: backends.append(backend))
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4")
    assert setup_distributed("cuda") == (True, 3, 4, torch.device("cuda", 1))
    assert setup_distributed("auto") == (True, 3, 4, torch.device("cuda", 1))
    assert backends == ["nccl", "nccl"]
    assert fake_cuda == [0, 0, 0, 1, 1, 1]
    with pytest.raises(UsageError, match="has 2 GPU"):
        resolve_device("cuda:2")


def test_sample_export_and_hellaswag_get_an_indexed_gpu(fake_cuda, monkeypatch, tmp_path):
    # the entry points of --sample, --export and hellaswag.py -d cuda, up to the moment they load the model
    seen = []

    def load_model(source, device):
        seen.append(device)
        raise UsageError("stop: the device is all this test needs")

    monkeypatch.setattr(train_gpt2, "load_model", load_model)
    monkeypatch.setattr(hellaswag, "load_model", load_model)
    for flags in (["--sample"], ["--export", str(tmp_path / "hf")], ["--sample", "--device", "cuda"]):
        with pytest.raises(SystemExit, match="stop"):
            main(["--init_from", "model.pt", *flags])
    monkeypatch.setattr(sys, "argv", ["hellaswag.py", "-m", "model.pt", "-d", "cuda",
                                      "--data", str(ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl")])
    with pytest.raises(SystemExit, match="stop"):
        hellaswag.main()
    assert seen == [torch.device("cuda", 0)] * 4


def test_no_gpu_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("gpu0")


def test_export_writes_float32_weights_even_when_sampling_in_bf16(tmp_path):
    # on a GPU --dtype auto samples in bf16; the exported folder must still hold the trained float32 weights
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": vars(model.config)}, ckpt)
    main(["--init_from", str(ckpt), "--export", str(tmp_path / "hf"), "--dtype", "bfloat16", "--device", "cpu"])
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours = model.transformer.h[1].mlp.c_fc.weight
    assert torch.equal(hf.transformer.h[1].mlp.c_fc.weight.t(), ours)
    assert torch.equal(hf.transformer.wte.weight, model.transformer.wte.weight[:50257])


def forked(cmd, timeout=600, sigterm_at=None, real_run=None):
    """gpu_check's run(cmd) with the command forked as launch forks one: `torchrun --standalone
    --nproc_per_node=1 SCRIPT` as one rank, `python SCRIPT` as a process (fresh interpreters and torchrun's
    agent are tested in test_train.py). Its lines as gpu_check reads them: the JSON last if it worked, the error
    if not."""
    if sigterm_at:  # a signal to torchrun as it runs: gpu_check's own run, real torchrun
        return real_run(cmd, timeout, sigterm_at)
    _, *rest = cmd  # sys.executable first
    ranks, env = None, None
    if rest[:2] == ["-m", "torch.distributed.run"]:
        assert rest[2:4] == ["--standalone", "--nproc_per_node=1"], cmd
        rest, ranks = rest[4:], 1
        env = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # torchrun sets it to 1 only for 2 or more
    r = launch(rest[1:], cwd=ROOT, ranks=ranks, script=ROOT / rest[0], env=env, timeout=timeout)
    text = r.stdout + r.stderr if r.returncode else r.stderr + r.stdout
    return r.returncode, [(0.0, line) for line in text.splitlines()]


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_with_a_tiny_model_and_skips_what_it_is_told(monkeypatch):
    # bench/gpu_check.py is what a GPU session runs first; here it runs on the CPU so that it cannot rot between
    # GPU sessions: every check but medium, which --skip leaves out as a short GPU slot would (its preset's
    # flags run in tests/test_fsdp.py). Its commands are forked (forked above): the same checks in half the time
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    monkeypatch.setattr(gpu_check, "run", functools.partial(forked, real_run=gpu_check.run))
    r = run_main(gpu_check.main, ["--device", "cpu", "--tiny", "--skip", "medium"])
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines[-1] == "11 passed, 0 failed, 1 skipped", r.stdout
    assert [line.split()[:2] for line in lines if line.startswith(("PASS", "SKIP", "FAIL"))] == \
        [["PASS", name] if name != "medium" else ["SKIP", name] for name in
         ["train", "memory", "fp16", "resume", "torchrun", "preempt", "fsdp", "medium", "sample", "export",
          "hellaswag", "eval_only"]]
    r = run_main(gpu_check.main, ["--device", "cpu", "--skip", "train"])
    assert r.returncode != 0 and r.stderr.strip().startswith("error: --skip train: it takes checks among")


def _grads_of(model, forward, x, y, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = forward(x, y)[1]
    (loss / 4).backward()  # scaled, as gradient accumulation over 4 micro-steps scales it
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_linear_cross_entropy_equals_the_models_loss_and_gradients(dtype):
    # bench/bench_train.py's fusedce variant: lm_head + the loss in row chunks, gradients made in the forward.
    # Oracle: GPT.forward's logits and F.cross_entropy, on the same weights and batch, ignored targets included.
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train import fused_ce_forward
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 50257, (3, 16)), torch.randint(0, 50257, (3, 16))
    y[2, 5:] = -1  # a padded val batch's rows
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16 matmuls whose sums are rounded per chunk vs once
    ref_loss, ref = _grads_of(model, model, x, y, autocast)
    for forward in (fused_ce_forward(model, 4), torch.compile(fused_ce_forward(model, 3), fullgraph=True)):
        loss, got = _grads_of(model, forward, x, y, autocast)
        assert abs(loss - ref_loss) <= tol * ref_loss
        for k in ref:  # lm_head.weight is the tied wte: its gradient sums the embedding's and the classifier's
            assert (got[k] - ref[k]).norm() <= tol * ref[k].norm(), k


@pytest.mark.slow
def test_bench_train_runs_every_lever_with_the_same_losses_on_cpu():
    # bench/bench_train.py is the GPU session's second run; here its levers must build, and from the same init
    # on the same batches give the flash variant's losses: cudnn+fusedce wraps the model in both levers' code
    r = launch(["--device", "cpu", "--tiny", "--steps", "2", "--rounds", "1", "--loop_steps", "4", "--variants",
                "flash,cudnn+fusedce"], cwd=ROOT, script=ROOT / "bench" / "bench_train.py", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    diffs = re.findall(r"^(\S+) vs flash: .* max \|diff\| (\S+)", r.stdout, re.M)
    assert [v for v, _ in diffs] == ["cudnn+fusedce"], r.stdout
    assert all(float(d) <= 1e-5 for _, d in diffs), r.stdout
    assert re.search(r"^loop \(train_gpt2.py, steps 2-3\): \d+ ms/step.*loop / model step = [\d.]+$", r.stdout, re.M)
    assert "in eval + no_grad" in r.stdout and "ms by kind" in r.stdout


CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # torch 2.11+'s default wheel
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("name, capability, archs, runs", [
    ("NVIDIA L40S", (8, 9), ["sm_80", "sm_86"], True),  # an sm_86 cubin runs on sm_89
    ("NVIDIA H100 80GB HBM3", (9, 0), CU130, True),
    ("NVIDIA H100 80GB HBM3", (9, 0), ["sm_80", "sm_90a"], True),
    ("NVIDIA H100 80GB HBM3", (9, 0), ["sm_80", "sm_86"], False),  # a cubin runs on its own major only
    ("NVIDIA GB200", (10, 0), ["sm_80", "sm_90", "compute_90"], True),  # PTX is compiled for newer GPUs
    ("NVIDIA GB300", (10, 3), ["sm_90", "sm_100a"], False),  # sm_100a is 10.0's alone
    ("Tesla V100-SXM2-16GB", (7, 0), CU130, False),
    ("Tesla V100-SXM2-16GB", (7, 0), CU126, True),
    ("Tesla P100-PCIE-16GB", (6, 0), CU130, False),
])
def test_a_gpu_without_kernels_in_this_torch_is_one_line_with_the_install_that_works(
        fake_cuda, monkeypatch, name, capability, archs, runs):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    if runs:
        assert resolve_device("cuda") == torch.device("cuda", 0)
        return
    with pytest.raises(UsageError) as e:
        resolve_device("auto")
    message = str(e.value)
    assert "\n" not in message and name in message and " ".join(archs) in message
    assert ("whl/cu126" in message) == (capability < (7, 5)), message


def test_every_script_checks_the_gpus_architecture(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    for argv in (["--data", "input.txt", "--log_dir", str(tmp_path / "run")], ["--init_from", "x.pt", "--sample"]):
        with pytest.raises(SystemExit, match="V100.*has no kernels.*cu126"):
            main(argv)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(sys, "argv", ["hellaswag.py", "-m", "gpt2", "--data",
                                      str(ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl")])
    with pytest.raises(SystemExit, match="V100.*has no kernels"):
        hellaswag.main()
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match="V100.*has no kernels"):
        gpu_check.main()


# -----------------------------------------------------------------------------
# a GPU box whose GPUs this torch cannot use: the NVIDIA kernel module's version file (or AMD's /dev/kfd) is
# there, torch.cuda.is_available() is False


OLD_DRIVER = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023"
OPEN_580 = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
            "(dvs-builder@U16-I1-N08-07-2)  Sun Jul 27 06:54:38 UTC 2025")
# what torch.cuda.init() raises when CUDA cannot start (c10/cuda/CUDAFunctions.cpp): it found no driver
# library (a container started without its GPUs) or no GPU, which is_available() leaves unsaid, or it failed,
# which is_available() warns at its first call in a process
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed "
             "a driver from http://www.nvidia.com/Download/index.aspx")
NO_GPU = "No CUDA GPUs are available"
UNEXPECTED = ("Unexpected error from cudaGetDeviceCount(). Did you run some cuda functions before calling "
              "NumCudaDevices() that might have already set an error? Error {}")
ERROR_802 = UNEXPECTED.format("802: system not yet initialized")  # an HGX box whose fabric manager is down
ERROR_804 = UNEXPECTED.format("804: forward compatibility was attempted on non supported HW")
ERROR_999 = ("CUDA unknown error - this may be due to an incorrectly set up environment, e.g. changing env "
             "variable CUDA_VISIBLE_DEVICES after program start. Setting the available devices to be zero.")


@pytest.fixture
def gpu_box(monkeypatch, tmp_path):
    """gpu_box(driver, cuda, hip=None, kfd=False, cuda_error=NO_DRIVER): torch sees no GPU, on a machine
    whose NVIDIA kernel module reports the line `driver` (None: not loaded) or with AMD's /dev/kfd, with this
    torch built for CUDA `cuda` or ROCm `hip` (both None: a CPU build). CUDA cannot start, with torch's
    `cuda_error`: is_available() warns it at its first call only, as torch's does; init() raises it."""
    def make(driver, cuda, hip=None, kfd=False, gfx=90402, cuda_error=NO_DRIVER):
        nvidia, amd, nodes = tmp_path / "nvidia_version", tmp_path / "kfd", tmp_path / "nodes"
        for path in (nvidia, amd):
            path.unlink(missing_ok=True)
        shutil.rmtree(nodes, ignore_errors=True)
        if driver:
            nvidia.write_text(f"{driver}\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
        if kfd:
            amd.touch()
            # the driver's topology: node 0 the CPU, node 1 the GPU (gfx942, an MI300X, by default)
            for node, version in enumerate((0, gfx)):
                (nodes / str(node)).mkdir(parents=True)
                (nodes / str(node) / "properties").write_text(
                    f"cpu_cores_count {0 if node else 96}\nsimd_count {304 if node else 0}\n"
                    f"gfx_target_version {version}\nvendor_id {4098 if node else 0}\n")
        monkeypatch.setattr(devices, "NVIDIA_DRIVER", str(nvidia))
        monkeypatch.setattr(devices, "AMD_DRIVER", str(amd))
        monkeypatch.setattr(devices, "AMD_TOPOLOGY", str(nodes))
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip)
        counted = []

        def is_available():  # torch keeps its first count, and warns of a failure there only
            if not counted and cuda_error not in (NO_DRIVER, NO_GPU):
                warnings.warn(f"CUDA initialization: {cuda_error} (Triggered internally at "
                              "/pytorch/c10/cuda/CUDAFunctions.cpp:109.)", UserWarning)
            counted.append(0)
            return False

        def init():
            raise RuntimeError(cuda_error)

        monkeypatch.setattr(torch.cuda, "is_available", is_available)
        monkeypatch.setattr(torch.cuda, "init", init)
    for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "RANK", "LOCAL_RANK",
              "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return make


@pytest.mark.parametrize("driver, cuda, hip, kfd, env, words", [
    # pip's default wheel (CUDA 13.0) on a 535 driver: torch prints "driver too old" and sees no GPU
    (OLD_DRIVER, "13.0", None, False, {}, ["this machine's NVIDIA driver 535.104.05 is too old",
                                           "CUDA 13.0 needs a driver >= 580", "install a driver >= 580",
                                           "which run on drivers >= 525: pip install --force-reinstall torch==",
                                           "--index-url https://download.pytorch.org/whl/cu126"]),
    (OPEN_580, None, None, False, {}, ["NVIDIA driver 580.65.06", "is a CPU build", "whl/cu130 (drivers >= 580)",
                                       "whl/cu126 (drivers >= 525)"]),
    (OPEN_580, "13.0", None, False, {"CUDA_VISIBLE_DEVICES": ""}, [
        "NVIDIA driver 580.65.06, new enough for this torch's CUDA 13.0, but", "CUDA_VISIBLE_DEVICES='' hides them",
        "nvidia-smi"]),
    (OPEN_580, "13.0", None, False, {}, ["new enough", "a container started without --gpus all", "nvidia-smi"]),
    (None, "13.0", None, True, {}, ["AMD's ROCm driver", "is built for CUDA 13.0", "install a ROCm build of torch",
                                    "pytorch.org/get-started/locally"]),
    (None, None, "6.4.43482-0f2d60242", True, {"HIP_VISIBLE_DEVICES": ""}, [
        "(ROCm 6.4.43482-0f2d60242) sees no GPU", "HIP_VISIBLE_DEVICES='' hide them", "rocm-smi"]),
], ids=["cuda13-driver535", "cpu-build", "CUDA_VISIBLE_DEVICES", "container", "amd-cuda-build", "rocm-hidden"])
def test_a_gpu_box_whose_gpus_this_torch_cannot_use_stops_auto_and_cuda_in_one_line(
        gpu_box, monkeypatch, driver, cuda, hip, kfd, env, words):
    gpu_box(driver, cuda, hip, kfd)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for arg in ("auto", "cuda", "cuda:1"):
        with pytest.raises(UsageError) as e:
            resolve_device(arg)
        message = str(e.value)
        assert message.startswith(f"--device {arg}: ") and "\n" not in message, message
        assert message.endswith("; --device cpu runs on the CPU anyway") and "install pip" not in message
        assert all(w in message for w in words), message
    assert resolve_device("cpu") == torch.device("cpu")  # asked for, the CPU runs there
    gpu_box(None, cuda, hip)  # a machine without GPUs (the quickstart's laptop): auto is its CPU, as before
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("error, words", [
    (ERROR_802, ['but CUDA cannot start ("Error 802: system not yet initialized"): the fabric manager',
                 "sudo systemctl start nvidia-fabricmanager (the package nvidia-fabricmanager-580, at the "
                 "driver's version 580.65.06)", "nvidia-smi -q | grep -i fabric shows its state"]),
    (ERROR_804, ['but CUDA cannot start: torch says "Error 804: forward compatibility was attempted on non '
                 'supported HW"']),
    (ERROR_999, [f'but CUDA cannot start: torch says "{ERROR_999}"']),
    (NO_DRIVER, ["they are hidden from this process (a container started without --gpus all?)"]),
    (NO_GPU, ["they are hidden from this process"]),
], ids=["802-fabric-manager", "804", "999", "no-driver", "no-gpu"])
def test_a_gpu_box_whose_cuda_cannot_start_says_why_in_torchs_words_and_802_names_the_fabric_manager(
        gpu_box, error, words):
    # an 8-GPU HGX box whose fabric manager is down: nvidia-smi lists its GPUs, torch warns "Error 802: system
    # not yet initialized" and sees none. It warns at its first call only: `cuda` and `cuda:1` get no warning
    gpu_box(OPEN_580, "13.0", cuda_error=error)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for arg in ("auto", "cuda", "cuda:1"):
            with pytest.raises(UsageError) as e:
                resolve_device(arg)
            message = str(e.value)
            assert message.startswith(f"--device {arg}: this machine has NVIDIA driver 580.65.06, new enough "
                                      "for this torch's CUDA 13.0, but ") and "\n" not in message, message
            assert all(w in message for w in words), message
            assert ("hidden" in message) == (error in (NO_DRIVER, NO_GPU)), message
            assert ("fabricmanager" in message) == (error == ERROR_802), message
    assert len(warned) == (error not in (NO_DRIVER, NO_GPU))  # as torch: once, and for a failure only


@pytest.mark.parametrize("gfx", [90012, 110003])  # a Ryzen laptop's Radeon (gfx90c), a desktop's RX 7600 (gfx1103)
def test_an_amd_laptop_or_desktop_keeps_the_cpu_for_auto_and_hears_of_rocm_for_cuda(gpu_box, gfx):
    # /dev/kfd is there on most machines with an AMD GPU: only an Instinct one is a GPU box torch should use
    gpu_box(None, "13.0", kfd=True, gfx=gfx)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="^--device cuda: this machine has AMD's ROCm driver .* ROCm build"):
        resolve_device("cuda")
    gpu_box(None, "13.0", kfd=True, gfx=90010)  # an MI250X
    with pytest.raises(UsageError, match="^--device auto: this machine has AMD's ROCm driver"):
        resolve_device("auto")


def test_every_script_stops_on_a_gpu_box_its_torch_cannot_use_before_any_work(gpu_box, monkeypatch, tmp_path):
    gpu_box(OLD_DRIVER, "13.0")
    too_old = r"^error: --device (auto|cuda): this machine's NVIDIA driver 535.104.05 is too old .*whl/cu126"
    for argv in (TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "1", "--log_dir", str(tmp_path / "run")],
                 ["--init_from", "x.pt", "--sample"], ["--init_from", "x.pt", "--export", str(tmp_path / "hf")]):
        with pytest.raises(SystemExit, match=too_old):
            main(argv)
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()
    monkeypatch.setattr(sys, "argv", ["hellaswag.py", "-m", "gpt2", "--data",
                                      str(ROOT / "tests" / "fixtures" / "hellaswag_val_100.jsonl")])
    with pytest.raises(SystemExit, match=too_old):
        hellaswag.main()
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    with pytest.raises(SystemExit, match=too_old):
        gpu_check.main()


# -----------------------------------------------------------------------------
# AMD GPUs: a ROCm build of torch drives them through torch.cuda


AMD = {  # get_device_name, get_device_properties().gcnArchName, get_device_capability (the gfx target's numbers)
    "MI300X": ("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", (9, 4)),
    "MI250X": ("AMD Instinct MI250X/MI250", "gfx90a:sramecc+:xnack-", (9, 0)),
    "RX 9070 XT": ("AMD Radeon RX 9070 XT", "gfx1201", (12, 0)),
    "RX 7900 XTX": ("AMD Radeon RX 7900 XTX", "gfx1100", (11, 0)),
    "RX 6900 XT": ("AMD Radeon RX 6900 XT", "gfx1030", (10, 3)),
}
# gfx targets as a ROCm build's torch.cuda.get_arch_list() lists them
ROCM = ["gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100", "gfx1101"]


@pytest.fixture
def fake_rocm(monkeypatch):
    """fake_rocm(gpu, archs=ROCM): a ROCm build of torch with two GPUs of AMD, as far as torch.version,
    torch.cuda's queries and `import triton` tell. torch.cuda.is_bf16_supported is torch's own."""
    def make(gpu, archs=ROCM):
        name, arch, (major, minor) = AMD[gpu]
        monkeypatch.setattr(torch.version, "hip", "6.4.43482-0f2d60242")
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(
            name=name, gcnArchName=arch, major=major, minor=minor, total_memory=64 * 2**30))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (60 * 2**30, 64 * 2**30))
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # ROCm's pytorch-triton-rocm
        return torch.device("cuda", 0)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return make


class OnTheGPU(Exception):
    """Where a CPU build of torch truly cannot go on: the model moved onto the GPU."""


@pytest.mark.parametrize("gpu, peak", [("MI300X", 1307.4e12), ("MI250X", 191.5e12)])  # an MI250X's GCD: half
def test_an_mi300x_and_an_mi250x_reach_step_0_with_bf16_compile_and_mfu(fake_rocm, monkeypatch, capsys, tmp_path,
                                                                         gpu, peak):
    fake_rocm(gpu)
    resolved = {}

    def spy(fn):
        def recorded(*args):
            resolved[fn.__name__] = fn(*args)
            return resolved[fn.__name__]
        return recorded

    def to(model, *args, **kwargs):
        if args and torch.device(args[0]).type == "cuda":
            raise OnTheGPU(args[0])
        return to_cpu(model, *args, **kwargs)

    to_cpu = GPT.to
    monkeypatch.setattr(GPT, "to", to)
    monkeypatch.setattr(train_gpt2, "resolve_precision", spy(train_gpt2.resolve_precision))
    monkeypatch.setattr(train_gpt2, "resolve_compile", spy(train_gpt2.resolve_compile))
    with pytest.raises(OnTheGPU) as e:
        main(TINY + ["--data", str(ROOT / "input.txt"), "--log_dir", str(tmp_path / "run")])
    device, precision = e.value.args[0], resolved["resolve_precision"]
    name, arch, _ = AMD[gpu]
    assert device == torch.device("cuda", 0)  # no refusal: its gfx target is in the list
    assert (precision.dtype, precision.scaler) == ("bfloat16", False)
    assert f"--dtype auto: {name} ({arch.split(':')[0]}) has bf16 matrix cores" in precision.reason
    assert resolved["resolve_compile"] == (True, "")  # inductor through ROCm's Triton
    assert "memory plan per GPU" in capsys.readouterr().out  # and its memory check passed
    assert peak_flops(device, precision.dtype) == peak  # the step lines print MFU
    # under torchrun the process group talks the `nccl` backend, which a ROCm torch runs on RCCL
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: backends.append(backend))
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert setup_distributed("auto") == (True, 1, 2, torch.device("cuda", 1)) and backends == ["nccl"]


def test_an_amd_gpu_whose_target_this_rocm_torch_lacks_is_one_line_naming_it(fake_rocm):
    fake_rocm("RX 9070 XT")
    with pytest.raises(UsageError) as e:
        resolve_device("auto")
    message = str(e.value)
    assert "\n" not in message and message.startswith("AMD Radeon RX 9070 XT (gfx1201) has no kernels"), message
    assert f"(ROCm 6.4.43482-0f2d60242, built for {' '.join(ROCM)})" in message
    assert "install a ROCm build of torch for gfx1201, from https://pytorch.org/get-started/locally/" in message
    fake_rocm("RX 9070 XT", archs=ROCM + ["gfx1200", "gfx1201"])
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_amd_gpus_without_bf16_instructions_take_fp16_with_a_grad_scaler(fake_rocm):
    # torch.cuda.is_bf16_supported says yes to every AMD GPU; RDNA 2 (gfx1030) has no bf16 instructions
    picked = {}
    for gpu in ("MI300X", "MI250X", "RX 7900 XTX", "RX 6900 XT"):
        p = resolve_precision("auto", fake_rocm(gpu))
        picked[gpu] = p.dtype, p.scaler
        assert torch.cuda.is_bf16_supported(including_emulation=False)
    assert picked == {"MI300X": ("bfloat16", False), "MI250X": ("bfloat16", False),
                      "RX 7900 XTX": ("bfloat16", False), "RX 6900 XT": ("float16", True)}
