"""
A SIGTERM or SIGINT stops a run at a step boundary with a checkpoint, instead of killing it mid-step: a spot
instance reclaimed, SLURM's time limit, a Kubernetes eviction, Ctrl-C, and torchrun passing any of these on to
its ranks. Each sends one of them, then kills after a grace period (30 s or more). A second signal ends the
process at once.
"""
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """With it, the first SIGTERM or SIGINT only sets `signal`, which the loop reads at its next step
    boundary; the handlers before it come back on exit. A signal this process ignores (nohup, a background
    job's SIGINT) stays ignored."""

    def __init__(self, say):
        self.say = say  # whether this process prints the first signal's line (rank 0)
        self.signal = None  # the first signal's number, once one came
        self._before = {}

    def __enter__(self):
        # Python runs signal handlers in the main thread, and only there can set them
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    @property
    def stopped_by(self):
        # a rank stopped by another's signal ends as if it had one too: every rank exits alike
        return self.signal or signal.SIGTERM

    def summary(self, step, checkpoint):
        """The run's last line, once the loop stopped after `step` and wrote `checkpoint`."""
        where = "" if self.signal else " on another rank"
        return (f"{signal.Signals(self.stopped_by).name}{where}: stopped after step {step}, checkpoint "
                f"{checkpoint}; the same command with --resume goes on from step {step + 1}")

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            # os.write, not print: a handler that prints while the loop prints raises "reentrant call"
            if self.say:
                os.write(2, f"{name}: stopping at the end of this step with a checkpoint; "
                            f"another {name} ends the run at once\n".encode())
            return
        signal.signal(signum, signal.SIG_DFL)  # the second: die of it, as without this handler
        os.kill(os.getpid(), signum)
