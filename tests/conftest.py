import contextlib
import fcntl
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest

# the test machines have no network: never let transformers or datasets try the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# pytest -n N: the workers share the cores, one thread each (read at import)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # large real data, beside the checkout; absent on a user's clone


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip(f"needs the real data in {SHARED} (not part of the repository)")
    return SHARED


def run_main(main, args):
    """A script's main(args) in this process, as its command line would end: (returncode, stdout, stderr). For
    the tests where the process boundary is not the point: the same code, without a fresh interpreter's imports."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:  # as the interpreter ends: a string is printed to stderr, with exit code 1
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The README's quickstart command, cut to 4 steps, run once as a user runs it, once for all the workers of
    pytest -n (the first to ask runs it, under a lock): (its folder, the result)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if "PYTEST_XDIST_WORKER" in os.environ else shared  # the workers' common folder
    folder, result = shared / "quickstart", shared / "quickstart.json"
    with open(shared / "quickstart.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            folder.mkdir()
            r = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), "--preset", "shakespeare",
                                "--max_steps", "4", "--eval_interval", "2", "--val_tokens", "2048"], cwd=folder,
                               capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
            result.write_text(json.dumps({"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}))
    return folder, SimpleNamespace(**json.loads(result.read_text()))


def pytest_collection_modifyitems(items):
    """The files of the longest runs first, so that pytest -n's workers, which take a file at a time in this
    order, end together."""
    first = ["test_devices.py", "test_train.py", "test_restarts.py", "test_notebook.py", "test_ranks_agree.py",
             "test_fsdp.py", "test_memory.py"]
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else len(first))


def pytest_xdist_auto_num_workers(config):
    """pytest -n auto (pytest.ini): a worker per core, at most 4; a file runs on one worker, and the longest
    file takes about 40% of the suite."""
    return min(os.cpu_count() or 1, 4)


# The forked processes' server imports what the runs import (hf_export: transformers), once a session; each
# process is a fork of it
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["conftest", "train_gpt2", "torch._dynamo", "torch._inductor.compile_fx",
                                   "hellaswag", "memory_plan", "hf_export", "torch.distributed.fsdp",
                                   "torch.distributed.checkpoint.state_dict"])


def _rank(script, args, cwd, env, out, err):
    """One process: `python script args` in cwd with env, its stdout and stderr to the files out and err."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()  # the caller's environment now, not the server's when it started
    # SIGINT's default, as a foreground `python` and torchrun's ranks (exec'd) have it: a forkserver started while
    # its pytest worker ignored SIGINT would pass that on to every process it forks
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    import torch
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))  # read at import, too late
    if "TORCH_LOGS" in env:
        torch._logging._internal._init_logs()  # also read at import
    code = 0
    try:
        if os.path.samefile(script, ROOT / "train_gpt2.py"):
            import train_gpt2
            train_gpt2.main(args)
        else:
            sys.argv = [str(script)] + args
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # as the interpreter ends: a string is printed to stderr, with exit code 1
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# bind(port 0) then close frees the port for the kernel to give another test's bind or connect, and a TCPStore
# client then joins whatever listens there (its server waits 600 s): so ports below the ephemeral range,
# each locked (a byte of one file, until the process ends) by one pytest process, of any worker or session.
_PORTS = SimpleNamespace(lock=None, next=20000)


def free_port():
    """A TCP port that no other test process and no kernel allocation will take: for the ranks' rendezvous."""
    if _PORTS.lock is None:  # kept open: closing any descriptor of the file would drop the process's locks
        _PORTS.lock = open(Path(tempfile.gettempdir()) / "nanogpt-tests-ports.lock", "a")
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: macOS's range starts at 49152
        ephemeral = 32768
    for port in range(_PORTS.next, ephemeral):
        try:
            fcntl.lockf(_PORTS.lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)  # another pytest process's?
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # another program's?
        except OSError:
            continue
        _PORTS.next = port + 1
        return port
    raise RuntimeError(f"no free port left below {ephemeral}")


def launch(args, cwd, ranks=None, script=ROOT / "train_gpt2.py", env=None, timeout=300):
    """`python script args` (ranks None), or `torchrun --standalone --nproc_per_node=RANKS script args`, as far as
    the script can tell: torchrun's RANK, WORLD_SIZE and MASTER_ADDR/PORT (not its agent's store), one thread a
    rank (OMP_NUM_THREADS=1), the ranks' stdout and stderr each joined, and the others stopped when one fails.
    Each process is forked from a server that has imported torch and train_gpt2: 10 tiny steps on 2 ranks take
    2 s, against 7.5 s under torchrun (2-core VM, 2026-12-02), which is tested where it is the point. Returns
    (returncode, stdout, stderr); a hang past the timeout fails the test."""
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if ranks else {}), **(env or {})}
    port = free_port() if ranks else None
    world = ranks or 1
    with tempfile.TemporaryDirectory() as logs:
        files = [(os.path.join(logs, f"{r}.out"), os.path.join(logs, f"{r}.err")) for r in range(world)]
        procs = []
        for r in range(world):
            rank_env = env if ranks is None else {**env, "RANK": str(r), "LOCAL_RANK": str(r),
                                                  "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(FORKSERVER.Process(target=_rank, args=(str(script), [str(a) for a in args], str(cwd),
                                                                rank_env, *files[r])))
            procs[-1].start()
        deadline, code, failed_at = time.monotonic() + timeout, 0, None
        while any(p.exitcode is None for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.1)
            if not code and any(p.exitcode for p in procs):  # as torchrun: the first failure stops the others
                code, failed_at = next(p.exitcode for p in procs if p.exitcode), time.monotonic()
            if time.monotonic() > deadline or (code and time.monotonic() > failed_at + 5):  # 5 s to say why
                for p in procs:
                    if p.exitcode is None:
                        os.kill(p.pid, signal.SIGKILL)
                        p.join()
                if not code:
                    pytest.fail(f"still running after {timeout} s: {script} {' '.join(map(str, args))}")
        out, err = ("".join(open(f[i]).read() for f in files) for i in (0, 1))
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)
