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
# writes), or at `STEP hellaswag` (HellaSwag's first batch after step STEP's val), rank RANK sends SIGNAL to TARGET,
# then waits until its own handler has run, so the run stops at the next check whatever the machine's load:
#   self, torchrun: itself, or torchrun (which passes it on);
#   repeat: itself twice, as torchrun forwarding to a rank what the scheduler sent it too (the same stop);
#   late: itself again, preemption.REPEAT_S after the first (ends the process at once);
#   ranks,torchrun / torchrun,ranks: every rank and torchrun, 50 ms apart or in one loop, as SLURM, systemd and
#   pkill signal every process of the job.
SIGNALLER = """
import os, signal, sys, time, hellaswag, logger, preemption, train_gpt2
rank, signame, target, where = sys.argv[1].split(" ", 3)
sig, handled, armed = getattr(signal, signame), [], []
def handle(self, signum, frame, _real=preemption.StopOnSignal._handle):
    handled.append(signum)
    _real(self, signum, frame)
preemption.StopOnSignal._handle = handle
def send():
    torchrun = os.getppid()
    ranks = [int(pid) for pid in open(f"/proc/{torchrun}/task/{torchrun}/children").read().split()]
    if target == "ranks,torchrun":
        for pid in ranks:
            os.kill(pid, sig)
        time.sleep(0.05)
        os.kill(torchrun, sig)
    elif target == "torchrun,ranks":
        for pid in [torchrun] + ranks:
            os.kill(pid, sig)
    else:
        os.kill(torchrun if target == "torchrun" else os.getpid(), sig)
    deadline = time.monotonic() + 60
    while not handled and time.monotonic() < deadline:
        time.sleep(0.01)
    if target in ("repeat", "late"):  # once the first was handled: two pending signals are handled as one
        time.sleep(0 if target == "repeat" else preemption.REPEAT_S + 0.5)
        os.kill(os.getpid(), sig)
        time.sleep(0 if target == "repeat" else 60)
def log(self, step, stream, *args, _real=logger.Logger.log):
    _real(self, step, stream, *args)
    if os.environ.get("RANK", "0") == rank and f"{step} {stream}" == where:
        send()
    if f"{step} val" == where.replace("hellaswag", "val"):
        armed.append(True)
def ending_losses(*args, _real=hellaswag.ending_losses):
    if armed and os.environ.get("RANK", "0") == rank and where.endswith("hellaswag"):
        armed.clear()
        send()
    return _real(*args)
logger.Logger.log = log
hellaswag.ending_losses = ending_losses
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
    cwd.mkdir(exist_ok=True)
    (cwd / "signaller.py").write_text(SIGNALLER)
    return launch([plan] + args, cwd=cwd, ranks=ranks, script=cwd / "signaller.py")


def resume_to_the_end_equals(oracle, cwd, ranks, flags, at=7):
    r = launch(ARGS + flags + ["--resume"], cwd=cwd, ranks=ranks)
    assert r.returncode == 0 and f"resuming at step {at}" in r.stdout, r.stderr
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
    assert f"{signame}: stopping after this step with a checkpoint" in r.stderr or rank != "0"
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1] == f"7 stopped {signum}"  # for job scripts
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


# SLURM (scancel, the time limit), systemd and pkill signal torchrun and every rank; torchrun then forwards its own
EVERY_PROCESS = [(flags, order) for flags in ([], ["--fsdp"]) for order in ("ranks,torchrun", "torchrun,ranks")]


@pytest.mark.slow
@pytest.mark.parametrize("flags, order", EVERY_PROCESS,
                         ids=[f"{order} {' '.join(flags)}".strip() for flags, order in EVERY_PROCESS])
def test_a_sigterm_to_every_process_under_torchrun_stops_with_a_checkpoint(tmp_path, oracles, flags, order):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    rc, out, err = torchrun(TORCHRUN_2, ["signaller.py", f"0 SIGTERM {order} 5 train"] + ARGS + flags,
                            cwd=tmp_path)
    assert rc != 0 and "got signal: 15" in err, err[-3000:]  # torchrun ends as it does on a signal
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "model_000007.pt"], err[-3000:]
    assert "SIGTERM: stopped after step 6, checkpoint run/model_000007.pt" in out
    resume_to_the_end_equals(oracles(2, flags), tmp_path, 2, flags)


@pytest.fixture(scope="module")
def hella(tmp_path_factory):
    """The fixture's examples three times over: 90 fit the tiny model, so each of 2 ranks scores 3 batches of 16."""
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text((ROOT / "tests" / "fixtures" / "hellaswag_val_33.jsonl").read_text() * 3)
    return ["--hellaswag", "--hellaswag_data", str(path)]


IN_EVAL = [(None, [], "0"), (2, [], "1"), (2, ["--fsdp"], "0")]


@pytest.mark.parametrize("ranks, flags, rank", IN_EVAL,
                         ids=[f"rank {rank} of {ranks or 1} {' '.join(flags)}".strip() for ranks, flags, rank in IN_EVAL])
def test_a_signal_during_hellaswag_stops_between_its_batches_and_resume_redoes_that_eval(
        tmp_path, oracles, hella, ranks, flags, rank):
    flags = hella + flags
    r = signalled(f"{rank} SIGTERM self 5 hellaswag", ARGS + flags, tmp_path, ranks)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "5 val " in log and "5 hella " not in log and "5 train " not in log  # the eval cut short, unlogged
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt", "model_000005.pt"]
    assert "stopped in step 5's eval, checkpoint run/model_000005.pt; the same command with --resume goes on " \
           "from step 5" in r.stdout
    resume_to_the_end_equals(oracles(ranks, flags), tmp_path, ranks, flags, at=5)


def test_a_signal_before_an_eval_step_stops_without_the_eval(tmp_path, oracles):
    r = signalled("0 SIGTERM self 4 train", ARGS, tmp_path)  # step 5 is an eval step
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert "5 val" not in (tmp_path / "run" / "log.txt").read_text()
    assert "stopped in step 5's eval, checkpoint run/model_000005.pt" in r.stdout
    resume_to_the_end_equals(oracles(None, []), tmp_path, None, [], at=5)


def test_a_repeat_of_the_signal_is_the_same_stop_and_a_late_one_ends_the_run_at_once(tmp_path):
    r = signalled("0 SIGTERM repeat 5 train", ARGS, tmp_path / "repeat")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "repeat" / "run").iterdir()) == ["log.txt", "model_000007.pt"]
    r = signalled("0 SIGTERM late 5 train", ARGS, tmp_path / "late")
    assert r.returncode == -signal.SIGTERM  # killed by it, as without a handler
    assert sorted(p.name for p in (tmp_path / "late" / "run").iterdir()) == ["log.txt"]
    assert (tmp_path / "late" / "run" / "log.txt").read_text().splitlines()[-1].startswith("5 train ")


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
