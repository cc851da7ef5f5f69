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

from conftest import ROOT, launch
from test_train import TINY, assert_same_weights, expect_error

TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# checkpoints at steps 4, 8 and 10
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "10", "--checkpoint_interval", "4",
               "--eval_interval", "3", "--log_dir", "run", "--resume"]

# torchrun's worker: train_gpt2.main, except that on attempt N (TORCHELASTIC_RESTART_COUNT) the N-th stop of the
# plan ("RANK ACTION WHERE", separated by ";") is armed: rank RANK leaves a file named after what it does and on
# which attempt, and then kills itself with SIGKILL (`kill`) or stops answering (`hang`) right after it logs
# `STEP STREAM` (every rank calls Logger.log; only rank 0 writes), or after rank 0 wrote the temporary file of the
# checkpoint of `save STEP`, before its rename. Attempts past the plan's end run to the end.
WORKER = """
import os, signal, sys, threading, torch, logger, train_gpt2
plan = [stop.split(" ", 2) for stop in sys.argv[1].split(";")]
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank, action, where = plan[attempt] if attempt < len(plan) else (None, None, None)
armed = os.environ["RANK"] == rank
def stop_after(real, here):
    def wrapper(*args):
        real(*args)
        if armed and here(*args):
            open(f"{action}_rank{rank}_attempt{attempt}", "w").close()
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            threading.Event().wait()
    return wrapper
logger.Logger.log = stop_after(logger.Logger.log, lambda log, step, stream, *_: where == f"{step} {stream}")
torch.save = stop_after(torch.save, lambda ckpt, path: where == f"save {ckpt['step']}")
train_gpt2.main(sys.argv[2:])
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
            r = launch(ARGS + (["--fsdp"] if fsdp else []), cwd=folder, ranks=2)
            assert r.returncode == 0, r.stderr
            made[fsdp] = folder / "run"
        return made[fsdp]
    return oracle


# (the stops of the first attempts: (what, rank, where, the step the next attempt starts at), extra flags).
# One torchrun serves several stops: each restart is the next attempt, and the last one runs to the end
CASES = [
    ([("kill", "1", "2 train", 0),  # before the first checkpoint: the restart starts over
      ("kill", "1", "5 train", 4),  # after the checkpoint of step 4, with steps logged past it
      ("kill", "0", "save 8", 4),  # in the middle of writing model_000008.pt: its .tmp is written, not renamed
      # rank 1 stops answering: rank 0 waits in the next collective, gives up after --dist_timeout and exits 1
      # (at once: a dead group's destructors could deadlock it), and torchrun restarts the group
      ("hang", "1", "5 train", 4)],
     ["--dist_timeout", "20"]),  # 20 s: well over any wait in this tiny run, even beside another worker
    ([("kill", "0", "save 8", 4)], ["--fsdp"]),  # the same under FSDP, where rank 1 waits in the next collective
]


@pytest.mark.slow
@pytest.mark.parametrize("stops, flags", CASES,
                         ids=[", then ".join(f"{a} rank {r} at {w}" for a, r, w, _ in stops) + (" " + " ".join(f) if f else "")
                              for stops, f in CASES])
def test_torchrun_restarts_a_group_with_a_dead_rank_and_ends_as_the_uninterrupted_run(tmp_path, oracles, stops, flags):
    (tmp_path / "worker.py").write_text(WORKER)
    plan = ";".join(f"{rank} {action} {where}" for action, rank, where, _ in stops)
    rc, out, err = torchrun(TORCHRUN_2 + ["--max-restarts", "4"], ["worker.py", plan] + ARGS + flags, cwd=tmp_path,
                            timeout=150 * len(stops) + 150)
    assert rc == 0, err[-3000:]
    for attempt, (action, rank, where, _) in enumerate(stops):
        assert (tmp_path / f"{action}_rank{rank}_attempt{attempt}").exists(), f"rank {rank} never reached {where}"
    # one restart per stop, each continued from the newest complete checkpoint: attempt 0 starts at step 0, and
    # attempt n + 1 where stop n left it
    starts = [0] + [start for _, _, _, start in stops]
    assert out.count("starting from step 0") == starts.count(0)
    assert out.count("resuming at step 4") == starts.count(4)
    assert len(stops) + 1 == out.count("starting from step 0") + out.count("resuming at step")
    if any(action == "hang" for action, _, _, _ in stops):
        assert "error: rank 0: " in err and "--dist_timeout 20" in err, err[-3000:]
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
