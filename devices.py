"""
The device a run gets and what it can do: --device, a GPU box whose GPUs this torch cannot use, the GPU's
architecture against this torch's kernels (NVIDIA's sm_XY, AMD's gfx targets under ROCm), the autocast
precision and compile from what the GPU has, its peak FLOP/s for MFU, and glibc's CPU allocator.
Every script picks its device here: train_gpt2.py, hellaswag.py and bench/gpu_check.py.
"""
import contextlib
import ctypes
import glob
import os
import re
from typing import NamedTuple

import torch

from errors import UsageError


# There while the NVIDIA kernel module is loaded (its first line names the driver's version), and AMD's ROCm
# kernel driver's device: a GPU box, whatever this torch sees. An AMD laptop's or desktop's Radeon has
# /dev/kfd too: only Instinct GPUs (in the driver's topology, a folder per CPU or GPU) stop `--device auto`
NVIDIA_DRIVER = "/proc/driver/nvidia/version"
AMD_DRIVER = "/dev/kfd"
AMD_TOPOLOGY = "/sys/class/kfd/kfd/topology/nodes"
# the oldest NVIDIA driver each CUDA major runs on (a driver runs every minor of its major)
CUDA_DRIVER = {13: 580, 12: 525, 11: 450}


def best_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def wheels(cuda_tag):
    # --force-reinstall: pip takes an installed torch 2.13.0, whatever it was built for, as torch==2.13.0
    return (f"pip install --force-reinstall torch=={torch.__version__.split('+')[0]} "
            f"--index-url https://download.pytorch.org/whl/{cuda_tag}")


def unseen_nvidia_gpus():
    """Why torch sees none of the GPUs of a machine with the NVIDIA kernel module loaded, naming the fix."""
    with open(NVIDIA_DRIVER) as f:  # NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64]  580.65.06
        found = re.search(r"Kernel Module(?: for \S+)?\s+((\d+)\.[\d.]+)", f.read())
    driver = f"NVIDIA driver {found[1]}" if found else "the NVIDIA kernel module"
    if not torch.version.cuda:
        build = "a ROCm build, for AMD GPUs" if torch.version.hip else "a CPU build"
        return (f"this machine has {driver}, but this torch {torch.__version__} is {build}: install a CUDA "
                f"build, {wheels('cu130')} (drivers >= 580) or {wheels('cu126')} (drivers >= 525), then "
                "pip install -r requirements.txt")
    need = CUDA_DRIVER.get(int(torch.version.cuda.split(".")[0]))
    if found and need and int(found[2]) < need:
        older = (f", or the CUDA 12.6 wheels, which run on drivers >= 525: {wheels('cu126')}, then pip "
                 "install -r requirements.txt" if need > CUDA_DRIVER[12] else "")
        return (f"this machine's {driver} is too old for this torch {torch.__version__} (CUDA "
                f"{torch.version.cuda} needs a driver >= {need}), so it sees no GPU: install a driver >= "
                f"{need}{older}")
    enough = f", new enough for this torch's CUDA {torch.version.cuda}," if found and need else ","
    has = f"this machine has {driver}{enough} but"
    error = cuda_init_error()
    if error and re.search(r"\bError 802\b|system not yet initialized", error):
        # CUDA waits for the fabric manager to set up an NVSwitch box's NVLink; nvidia-smi lists the GPUs
        package = (f"nvidia-fabricmanager-{found[2]}, at the driver's version {found[1]}" if found
                   else "nvidia-fabricmanager-NNN, at the driver's version NNN.x")
        return (f"{has} CUDA cannot start (\"{error}\"): the fabric manager that an NVSwitch box (an 8-GPU "
                "HGX or DGX) needs is not running: sudo systemctl start nvidia-fabricmanager (the package "
                f"{package}); nvidia-smi -q | grep -i fabric shows its state")
    if error:
        return f"{has} CUDA cannot start: torch says \"{error}\""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{has} this torch {torch.__version__} sees no GPU: "
            + (f"CUDA_VISIBLE_DEVICES={hidden!r} hides them" if hidden is not None else
               "they are hidden from this process (a container started without --gpus all?)")
            + "; nvidia-smi says what this process can reach")


# what torch.cuda.init() raises where CUDA found no GPU or no driver library to start (CUDA_VISIBLE_DEVICES, a
# container without its GPUs): is_available() says nothing of these, and warns of every other failure
# (c10/cuda/CUDAFunctions.cpp)
NO_GPU_TO_START = ("No CUDA GPUs are available", "Found no NVIDIA driver on your system")


def cuda_init_error():
    """Why CUDA failed to start, in torch's words on one line ("Error 802: system not yet initialized"), or
    None. is_available() warns it only once per process, at the first device count, whose 0 torch keeps
    (c10::cuda::device_count): torch.cuda.init() counts again and raises it every time it is called."""
    try:
        torch.cuda.init()
    except RuntimeError as e:
        text = str(e).strip().split("\n")[0]  # TORCH_SHOW_CPP_STACKTRACES=1 adds C++ frames below
        if not text.startswith(NO_GPU_TO_START):
            # cudaGetDeviceCount's "Error N: ...", without torch's question before it (did you run cuda
            # functions before?), which misleads here
            coded = re.search(r"Error \d+: .*", text)
            return coded[0] if coded else text
    return None


def unseen_amd_gpus():
    """Why torch sees none of the GPUs of a machine with AMD's ROCm kernel driver, naming the fix."""
    found = f"this machine has AMD's ROCm driver ({AMD_DRIVER}), but this torch {torch.__version__}"
    if not torch.version.hip:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        return (f"{found} is {build}: install a ROCm build of torch, from "
                "https://pytorch.org/get-started/locally/ (its ROCm selector), then pip install -r "
                "requirements.txt")
    hidden = [f"{k}={os.environ[k]!r}" for k in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
              if k in os.environ]
    return (f"{found} (ROCm {torch.version.hip}) sees no GPU: "
            + (f"{' and '.join(hidden)} hide them" if hidden else
               f"can this user open {AMD_DRIVER} (the render and video groups)?")
            + "; rocm-smi says what this process can reach")


def amd_instinct_gpus():
    """Whether the ROCm driver lists an Instinct GPU: CDNA's gfx908 (MI100), gfx90a (MI200), gfx94x (MI300) or
    gfx95x (MI350), as gfx_target_version 90008, 90010, 9040x or 9050x."""
    for properties in glob.glob(os.path.join(AMD_TOPOLOGY, "*", "properties")):
        with open(properties) as f:
            found = re.search(r"^gfx_target_version (\d+)$", f.read(), re.MULTILINE)
        if found and (int(found[1]) in (90008, 90010) or int(found[1]) // 100 in (904, 905)):
            return True
    return False


def resolve_device(device_arg, local_rank=0):
    """--device as a torch.device; the one place every script picks its device. A bare `cuda` (and `auto` on a
    GPU machine) is this process's GPU, cuda:LOCAL_RANK: torch.cuda.set_device and NCCL need an index."""
    if (device_arg == "auto" or device_arg.split(":")[0] == "cuda") and not torch.cuda.is_available():
        # a GPU box whose GPUs torch cannot use: `auto` would take the CPU, eight ranks of it under torchrun
        amd = os.path.exists(AMD_DRIVER) and (device_arg != "auto" or amd_instinct_gpus())
        why = unseen_nvidia_gpus() if os.path.exists(NVIDIA_DRIVER) else unseen_amd_gpus() if amd else None
        if why:
            raise UsageError(f"--device {device_arg}: {why}; --device cpu runs on the CPU anyway")
    if device_arg == "auto":
        device_arg = best_device()
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise UsageError(f"--device {device_arg} is not a device: "
                         "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device_arg} asked for, but this torch sees no CUDA GPU; "
                             "use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device} asked for, but this machine has {torch.cuda.device_count()} "
                             "GPU(s); use --device cuda (under torchrun, one GPU per process)")
        check_arch(device)
    return device


def check_arch(device):
    """A GPU this torch has no kernels for fails at its first kernel ("no kernel image is available"): say
    so first. It runs an sm_XY cubin of its own major at or below its capability, or a compute_XY (PTX) at
    or below it; under ROCm, code objects for its own gfx target."""
    archs = torch.cuda.get_arch_list()
    if not archs:
        return  # a torch that does not say what it carries
    if torch.version.hip:  # gfx90a gfx942 gfx1100 ..., maybe with features (gfx90a:xnack-): the base targets
        target = gfx_target(device)
        if target in {arch.split(":")[0] for arch in archs}:
            return
        raise UsageError(f"{gpu_name(device)} has no kernels in this torch {torch.__version__} (ROCm "
                         f"{torch.version.hip}, built for {' '.join(archs)}): install a ROCm build of torch "
                         f"for {target}, from https://pytorch.org/get-started/locally/ (its ROCm selector)")
    major, minor = torch.cuda.get_device_capability(device)
    for arch in archs:  # e.g. sm_80, sm_90a (that capability only), compute_90 (PTX, compiled by the driver)
        if not (parsed := re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)):
            continue
        kind, m, n, suffix = parsed[1], int(parsed[2]), int(parsed[3]), parsed[4]
        if kind == "sm" and m == major and (n == minor if suffix == "a" else n <= minor):
            return
        if kind == "compute" and not suffix and (m, n) <= (major, minor):
            return
    old = (major, minor) < (7, 5)
    fix = (f"the CUDA 12.6 wheels, which still carry Pascal and Volta: {wheels('cu126')}" if old
           else "a torch built for a newer CUDA, from https://pytorch.org/get-started/locally/")
    raise UsageError(f"{gpu_name(device)} has no kernels in this torch {torch.__version__} "
                     f"(CUDA {torch.version.cuda}, built for {' '.join(archs)}): install {fix}, "
                     "then pip install -r requirements.txt")


class Precision(NamedTuple):
    """What resolve_precision chose: the autocast dtype (the weights and the optimizer stay float32), the
    reason the banner prints, and whether the loss needs a GradScaler (float16: its gradients underflow
    without one)."""
    dtype: str  # float32, bfloat16 or float16
    reason: str
    scaler: bool

    @property
    def autocast_dtype(self):
        return None if self.dtype == "float32" else getattr(torch, self.dtype)

    def autocast(self, device_type):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)


def resolve_precision(dtype_arg, device):
    """--dtype on `device`: the one place every script picks its precision (training, sampling,
    hellaswag.py)."""
    if dtype_arg == "float16":
        return Precision("float16", "float16 autocast with a GradScaler (--dtype float16)", True)
    if dtype_arg == "float32":
        return Precision("float32", "float32 (--dtype float32)", False)
    native_bf16 = device.type == "cuda" and has_bf16_cores(device)
    cores = "matrix cores" if torch.version.hip else "tensor cores"  # AMD's name for them
    if dtype_arg == "bfloat16":
        # asked for on a GPU without bf16 tensor cores it runs, emulated and slowly: say so rather than refuse
        slow = f"; emulated: {gpu_name(device)} has no bf16 {cores}, --dtype auto picks float16" \
            if device.type == "cuda" and not native_bf16 else ""
        return Precision("bfloat16", f"bfloat16 autocast (--dtype bfloat16{slow})", False)
    if device.type != "cuda":
        return Precision("float32", f"float32 (--dtype auto on {device.type})", False)
    if native_bf16:
        return Precision("bfloat16", f"bfloat16 autocast (--dtype auto: {gpu_name(device)} has bf16 {cores})",
                         False)
    # Volta and Turing (V100, T4, RTX 20xx) have fp16 tensor cores only; Pascal (P100, GTX 10xx) has none, but
    # its bf16 would be emulated while fp16 at least halves the activations' memory traffic
    return Precision("float16", f"float16 autocast with a GradScaler (--dtype auto: {gpu_name(device)} "
                                f"has no bf16 {cores})", True)


def has_bf16_cores(device):
    if torch.version.hip:
        # torch.cuda.is_bf16_supported says yes to every AMD GPU; Vega (gfx900-gfx906, MI50) and RDNA 1-2
        # (gfx10xx) have no bf16 instructions, and their fp16 runs at twice their fp32
        return not re.fullmatch(r"gfx(90[0-69c]|10\d\d)", gfx_target(device))
    return torch.cuda.is_bf16_supported(including_emulation=False)


def gfx_target(device):
    # an AMD GPU's LLVM target, gcnArchName without its features: gfx942 of gfx942:sramecc+:xnack-
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


def gpu_name(device):
    if torch.version.hip:  # its capability (9.4 for gfx942) is the gfx target's numbers, not NVIDIA's
        return f"{torch.cuda.get_device_name(device)} ({gfx_target(device)})"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def resolve_compile(compile_arg, device):
    """(compile or not, why it is off when left to its default). --compile where inductor cannot run is a
    UsageError: otherwise it fails at step 0 with a long inductor traceback."""
    if compile_arg is False:
        return False, ""
    if device.type != "cuda":
        # a CPU compiles (the tests do) but gains little for a long first step
        return bool(compile_arg), "" if compile_arg else f"off by default on {device.type}"
    missing = []
    try:
        import triton  # noqa: F401  inductor writes its GPU kernels in Triton, which has no official
                       # Windows build
    except ImportError:
        missing.append("Triton is not installed")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        missing.append(f"Triton needs compute capability >= 7.0, {gpu_name(device)} is older")
    if missing and compile_arg:
        raise UsageError(f"--compile cannot run here: {' and '.join(missing)}; pass --no-compile (or leave "
                         "--compile out: it is then off where it cannot run)")
    return not missing, " and ".join(missing)


def keep_freed_memory():
    # glibc returns each freed buffer over 32 MB to the OS, and taking it back costs a page fault per
    # 4 KB; a CPU micro-batch's logits (B*T*vocab floats) are hundreds of MB. Serving them from the heap
    # and never trimming it made CPU training steps ~1.6x faster here.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, Windows, musl): nothing to tune
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations up to 1 GiB come from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep freed heap memory for the next step


# Peak dense tensor-core FLOP/s per autocast dtype (float32: TF32 where the card has it), from NVIDIA's and
# AMD's datasheets and whitepapers (docs/precision.md gives the sources); a dtype a card lacks has no entry
PEAK_FLOPS = {
    "H200": dict(bfloat16=989e12, float16=989e12, float32=495e12),  # H200 SXM
    "H200 NVL": dict(bfloat16=836e12, float16=836e12, float32=418e12),
    "H100": dict(bfloat16=989e12, float16=989e12, float32=495e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H100 PCIe": dict(bfloat16=756e12, float16=756e12, float32=378e12),
    "H100 NVL": dict(bfloat16=836e12, float16=836e12, float32=418e12),
    "A100": dict(bfloat16=312e12, float16=312e12, float32=156e12),  # SXM and PCIe alike
    "A10": dict(bfloat16=125e12, float16=125e12, float32=62.5e12),
    "A10G": dict(bfloat16=70e12, float16=70e12),
    "RTX A6000": dict(bfloat16=154.8e12, float16=154.8e12, float32=77.4e12),
    "L40S": dict(bfloat16=362e12, float16=362e12, float32=183e12),
    "L40": dict(bfloat16=181e12, float16=181e12, float32=90.5e12),
    "L4": dict(bfloat16=121e12, float16=121e12, float32=60e12),
    "RTX 4090": dict(bfloat16=165.2e12, float16=165.2e12, float32=82.6e12),
    "RTX 4080": dict(bfloat16=97.5e12, float16=97.5e12, float32=48.7e12),
    "RTX 3090": dict(bfloat16=71e12, float16=71e12, float32=35.6e12),
    "RTX 3080": dict(bfloat16=59.5e12, float16=59.5e12, float32=29.8e12),
    "RTX 2080 Ti": dict(float16=53.8e12, float32=13.4e12),
    "RTX 2080": dict(float16=40.3e12, float32=10.1e12),
    "T4": dict(float16=65e12, float32=8.1e12),
    "V100": dict(float16=125e12, float32=15.7e12),  # SXM2 ("Tesla V100-SXM2-16GB")
    "V100 PCIE": dict(float16=112e12, float32=14e12),
    "V100S": dict(float16=130e12, float32=16.4e12),
    # float32 on MI300: TF32, which torch uses there under set_float32_matmul_precision("high") as on NVIDIA
    "MI300X": dict(bfloat16=1307.4e12, float16=1307.4e12, float32=653.7e12),
    "MI325X": dict(bfloat16=1307.4e12, float16=1307.4e12, float32=653.7e12),
    # an MI250X is two GCDs, each its own torch device: half the module's 383T, and of its FP32 matrix 95.7T
    # (no TF32 on CDNA 2); "AMD Instinct MI250X/MI250" names the MI250 too, whose MFU then reads 5% low
    "MI250X": dict(bfloat16=191.5e12, float16=191.5e12, float32=47.85e12),
}


def peak_flops(device, dtype):
    """Peak FLOP/s of this GPU in `dtype` (PEAK_FLOPS), or None: a CPU, an unknown GPU or a dtype it lacks."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device)).get(dtype)


def peak_flops_of(device_name):
    # as whole words, longest key first: a plain substring test takes "NVIDIA A100-SXM4-80GB" for an A10,
    # "NVIDIA L40S" for an L4 and "NVIDIA H100 PCIe" for the SXM part ("AMD Instinct MI250X/MI250": two words)
    words = device_name.upper().replace("-", " ").replace("/", " ").split()
    for key in sorted(PEAK_FLOPS, key=lambda k: -len(k.split())):
        n = len(key.split())
        if any(words[i:i + n] == key.upper().split() for i in range(len(words) - n + 1)):
            return PEAK_FLOPS[key]
    return {}
