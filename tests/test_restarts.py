"""
torchrun --max-restarts with --resume: one rank SIGKILLed (or hung) at an exact point of the first attempt, the
group restarted by torchrun, and the run it ends with against the oracle, the same 2-rank run never interrupted:
the same log.txt and bit-identical weights (resuming is exact). A hang fails the test at its timeout.
"""
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from test_train import TINY, assert_same_weights, expect_error

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# checkpoints at steps 4, 8 and 10
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "10", "--checkpoint_interval", "4",
               "--eval_interval", "3", "--log_dir", "run", "--resume"]

# torchrun's worker: train_gpt2.main, except that rank RANK, on the first attempt only, leaves a file named
# after what it does and then kills itself with SIGKILL (`kill`) or stops answering (`hang`) right after it
# logs `STEP STREAM` (every rank calls Logger.log; only rank 0 writes), or after rank 0 wrote the temporary file
# of the checkpoint of `save STEP`, before its rename
WORKER = """
import os, signal, sys, threading, torch, logger, train_gpt2
rank, action, where = sys.argv[1:4]
armed = os.environ["RANK"] == rank and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
def stop_after(real, here):
    def wrapper(*args):
        real(*args)
        if armed and here(*args):
            open(f"{action}_rank{rank}", "w").close()
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            threading.Event().wait()
    return wrapper
logger.Logger.log = stop_after(logger.Logger.log, lambda log, step, stream, *_: where == f"{step} {stream}")
torch.save = stop_after(torch.save, lambda ckpt, path: where == f"save {ckpt['step']}")
train_gpt2.main(sys.argv[4:])
"""


def torchrun(launcher, args, cwd, timeout=300):
    """(exit code, stdout, stderr) of a torchrun run; past the timeout it and its workers are killed, and the test
    fails: a group that hangs is the bug this file guards against."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(launcher + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: killed one by one, or they would hold the pipes open
        workers = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
        for pid in workers + [str(p.pid)]:
            os.kill(int(pid), signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s: {' '.join(args[-12:])}\n{err[-3000:]}")
    return p.returncode, out, err


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """The uninterrupted 2-rank runs, under DDP and under --fsdp, each made once, when a test first asks."""
    made = {}

    def oracle(fsdp):
        if fsdp not in made:
            folder = tmp_path_factory.mktemp("fsdp" if fsdp else "ddp")
            rc, out, err = torchrun(TORCHRUN_2, [str(ROOT / "train_gpt2.py")] + ARGS + (["--fsdp"] if fsdp else []),
                                    cwd=folder)
            assert rc == 0, err
            made[fsdp] = folder / "run"
        return made[fsdp]
    return oracle


# (what, rank, where, extra flags, the step the last attempt resumes at)
CASES = [
    ("kill", "1", "2 train", [], 0),  # before the first checkpoint: the restart starts over
    ("kill", "1", "5 train", [], 4),  # after the checkpoint of step 4, with steps logged past it
    ("kill", "0", "save 8", [], 4),  # in the middle of writing model_000008.pt: its .tmp is written, not renamed
    ("kill", "0", "save 8", ["--fsdp"], 4),  # the same under FSDP, where rank 1 waits in the next collective
    # rank 1 stops answering: rank 0 waits in the next collective, gives up after --dist_timeout and exits 1,
    # and torchrun restarts the group. 30 s: well over any wait in this tiny run, even on a loaded machine
    ("hang", "1", "5 train", ["--dist_timeout", "30"], 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("action, rank, where, flags, resumed_at", CASES,
                         ids=[f"{a} rank {r} at {w}{' ' + ' '.join(f) if f else ''}" for a, r, w, f, _ in CASES])
def test_torchrun_restarts_a_group_with_a_dead_rank_and_ends_as_the_uninterrupted_run(
        tmp_path, oracles, action, rank, where, flags, resumed_at):
    (tmp_path / "worker.py").write_text(WORKER)
    rc, out, err = torchrun(TORCHRUN_2 + ["--max-restarts", "3"], ["worker.py", rank, action, where] + ARGS + flags,
                            cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert (tmp_path / f"{action}_rank{rank}").exists(), f"rank {rank} never reached {where}"
    # one restart, and it continued from the newest complete checkpoint
    assert out.count("starting from step 0") == (2 if resumed_at == 0 else 1)
    assert ("resuming at step 4" in out) == (resumed_at == 4)
    if action == "hang":
        assert "error: rank 0: " in err and "--dist_timeout 30" in err, err[-3000:]
    oracle = oracles("--fsdp" in flags)
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(oracle))  # no .tmp left behind
    assert (tmp_path / "run" / "log.txt").read_text() == (oracle / "log.txt").read_text()
    for ckpt in ("model_000008.pt", "model_000010.pt"):
        assert_same_weights(oracle / ckpt, tmp_path / "run" / ckpt)


def test_restarts_over_several_nodes_on_torchruns_shared_store_stop_with_the_fix(tmp_path, monkeypatch):
    # what torchrun --nnodes=2 --max-restarts 3 gives each worker: the restart counts of two agents, which may
    # disagree, cannot keep the attempts apart in the store they share
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
                 "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "0",
                 "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    expect_error(ARGS + ["--log_dir", str(tmp_path / "run")], "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    assert not (tmp_path / "run").exists()
