"""
A SIGTERM or SIGINT (a spot instance reclaimed, SLURM's time limit, Ctrl-C, torchrun passing one on) stops the run
at the next step boundary with a checkpoint, on every rank at once; --resume then ends as the uninterrupted run.
"""
import os
import signal
import subprocess
import sys

import pytest

import preemption
from conftest import ROOT, launch
from test_restarts import TORCHRUN_2, torchrun
from test_train import TINY, assert_same_weights

# no checkpoint before the end but the one a signal makes
ARGS = TINY + ["--data", str(ROOT / "input.txt"), "--max_steps", "12", "--eval_interval", "5", "--log_dir", "run"]

# train_gpt2.main, with signals sent as the run goes: at `STEP STREAM` (right after every rank logs it; only rank 0
# writes) rank RANK sends SIGNAL to itself, or with `torchrun` as the target to torchrun, then waits until its own
# handler has run (torchrun passes it on), so the run stops after the next step whatever the machine's load.
# `twice` sends it again after that.
SIGNALLER = """
import os, signal, sys, time, logger, preemption, train_gpt2
rank, signame, target, where = sys.argv[1].split(" ", 3)
handled = []
def handle(self, signum, frame, _real=preemption.StopOnSignal._handle):
    handled.append(signum)
    _real(self, signum, frame)
preemption.StopOnSignal._handle = handle
def log(self, step, stream, *args, _real=logger.Logger.log):
    _real(self, step, stream, *args)
    if os.environ.get("RANK", "0") == rank and f"{step} {stream}" == where:
        sig = getattr(signal, signame)
        os.kill(os.getppid() if target == "torchrun" else os.getpid(), sig)
        deadline = time.monotonic() + 60
        while not handled and time.monotonic() < deadline:
            time.sleep(0.01)
        if target == "twice":  # once the first was handled: two signals before it would be handled as one
            os.kill(os.getpid(), sig)
            time.sleep(60)
logger.Logger.log = log
train_gpt2.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """The uninterrupted runs of ARGS, by launch's ranks (None: one process) and flags, each made once."""
    made = {}

    def oracle(ranks, flags):
        key = (ranks, tuple(flags))
        if key not in made:
            folder = tmp_path_factory.mktemp("oracle")
            r = launch(ARGS + flags, cwd=folder, ranks=ranks)
            assert r.returncode == 0, r.stderr
            made[key] = folder / "run"
        return made[key]
    return oracle


def signalled(plan, args, cwd, ranks=None):
    (cwd / "signaller.py").write_text(SIGNALLER)
    return launch([plan] + args, cwd=cwd, ranks=ranks, script=cwd / "signaller.py")


def resume_to_the_end_equals(oracle, cwd, ranks, flags):
    r = launch(ARGS + flags + ["--resume"], cwd=cwd, ranks=ranks)
    assert r.returncode == 0 and "resuming at step 7" in r.stdout, r.stderr
    assert (cwd / "run" / "log.txt").read_text() == (oracle / "log.txt").read_text()
    assert_same_weights(oracle / "model_000012.pt", cwd / "run" / "model_000012.pt")


# (ranks, flags, the rank signalled, the signal): under DDP and FSDP one rank alone has it, and the other stops too
CASES = [(None, [], "0", "SIGTERM"), (None, [], "0", "SIGINT"), (2, [], "1", "SIGTERM"),
         (2, ["--fsdp"], "0", "SIGTERM")]


@pytest.mark.parametrize("ranks, flags, rank, signame", CASES,
                         ids=[f"{signame} to rank {rank} of {ranks or 1} {' '.join(flags)}".strip()
                              for ranks, flags, rank, signame in CASES])
def test_a_signal_stops_every_rank_at_the_next_step_with_a_checkpoint_and_resume_is_exact(
        tmp_path, oracles, ranks, flags, rank, signame):
    r = signalled(f"{rank} {signame} self 5 train", ARGS + flags, tmp_path, ranks)
    signum = getattr(signal, signame)
    assert r.returncode == 128 + signum, r.stderr[-3000:]  # a job script can tell that the run is not done
    # the signal came after step 5 had run: step 6 runs (its all-reduce carries the news to every rank), then the
    # checkpoint of 7 steps is written, as at any checkpoint step
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "model_000007.pt"]
    assert f"{signame}{'' if rank == '0' else ' on another rank'}: stopped after step 6, checkpoint " \
           "run/model_000007.pt; the same command with --resume goes on from step 7" in r.stdout
    assert f"{signame}: stopping at the end of this step" in r.stderr or rank != "0"
    assert "step     7" not in r.stdout
    resume_to_the_end_equals(oracles(ranks, flags), tmp_path, ranks, flags)


@pytest.mark.slow
def test_torchrun_passes_a_sigterm_on_to_its_ranks_and_they_stop_with_a_checkpoint(tmp_path, oracles):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    rc, out, err = torchrun(TORCHRUN_2, ["signaller.py", "0 SIGTERM torchrun 5 train"] + ARGS, cwd=tmp_path)
    assert rc != 0 and "got signal: 15" in err, err[-3000:]  # torchrun ends as it does on a signal
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "model_000007.pt"]
    assert "SIGTERM: stopped after step 6, checkpoint run/model_000007.pt" in out
    resume_to_the_end_equals(oracles(2, []), tmp_path, 2, [])


def test_a_second_signal_ends_the_run_at_once(tmp_path):
    r = signalled("0 SIGTERM twice 5 train", ARGS, tmp_path)
    assert r.returncode == -signal.SIGTERM  # killed by it, as without a handler
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt"]
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1].startswith("5 train ")


def test_handlers_come_back_after_the_run_and_an_ignored_signal_stays_ignored():
    # a run under nohup, or a background job of a script, ignores SIGHUP or SIGINT: a handler would undo that
    before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with preemption.StopOnSignal(say=False) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_ctrl_c_on_a_terminal_run_stops_it_with_a_checkpoint(tmp_path):
    # the real thing: a process group's SIGINT, as a terminal sends it, to `python train_gpt2.py` itself (with
    # SIGINT's default disposition, which pytest's workers do not pass on)
    p = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py")] + ARGS[:-2] + ["--max_steps", "100000",
                         "--log_dir", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if line.startswith("step     3 | loss"):
                break
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT: stopped after step" in out and "Traceback" not in err
    assert len(list((tmp_path / "run").glob("model_*.pt"))) == 1
