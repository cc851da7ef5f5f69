"""
A SIGTERM or SIGINT stops a run with a checkpoint instead of killing it mid-step: a spot instance reclaimed,
SLURM's time limit or scancel, systemd stopping a unit, a Kubernetes eviction, `docker stop`, pkill, Ctrl-C,
and torchrun passing any of these on to its ranks. Each sends one of them, then SIGKILL after a grace period
as short as 10 s (docker): the run ends after the step in flight, or stops an eval between its batches.

Schedulers, systemd and pkill signal every process of the job, torchrun included, and torchrun then forwards
its own: a rank gets the same signal twice within milliseconds. So a repeat within REPEAT_S of the first is
the same stop; one later than that (a person who will not wait) ends the process at once.
"""
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 3.0  # torchrun forwards within milliseconds; a loaded box may take some hundreds


class Stopped(Exception):
    """Raised on every rank at once between an eval's batches: the eval is cut short and not logged."""


class StopOnSignal:
    """With it, the first SIGTERM or SIGINT only sets `signal`, which the loop reads at its next step
    boundary; the handlers before it come back on exit. A signal this process ignores (nohup, a background
    job's SIGINT) stays ignored."""

    def __init__(self, say, device="cpu", distributed=False):
        self.say = say  # whether this process prints the first signal's line (rank 0)
        self.device, self.distributed = device, distributed
        self.signal = None  # the first signal's number, once one came
        self._first_at = None
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

    def check(self):
        """An eval's check before each batch (and before samples): Stopped, on every rank, once any had a
        signal. A collective, so every rank calls it at the same points; the step does not call it, its flag
        rides the loss's all-reduce."""
        stop = self.signal is not None
        if self.distributed:
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag)
            stop = flag.item() > 0
        if stop:
            raise Stopped

    @property
    def stopped_by(self):
        # a rank stopped by another's signal ends as if it had one too: every rank exits alike
        return self.signal or signal.SIGTERM

    def summary(self, steps_done, checkpoint, in_eval):
        """The run's last line, once it stopped with `steps_done` steps done and `checkpoint` the newest."""
        name = signal.Signals(self.stopped_by).name + ("" if self.signal else " on another rank")
        where = f"stopped in step {steps_done}'s eval" if in_eval else f"stopped after step {steps_done - 1}"
        kept = f"checkpoint {checkpoint}" if checkpoint else "nothing to keep yet"
        return f"{name}: {where}, {kept}; the same command with --resume goes on from step {steps_done}"

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = signum, now
            # os.write, not print: a handler that prints while the loop prints raises "reentrant call"
            if self.say:
                os.write(2, f"{name}: stopping after this step with a checkpoint (an eval stops between its "
                            f"batches); a signal more than {REPEAT_S:g} s from now ends the run at once\n"
                         .encode())
            return
        if now - self._first_at <= REPEAT_S:  # torchrun's forward of what the scheduler sent every process
            return
        signal.signal(signum, signal.SIG_DFL)  # a later one: die of it, as without this handler
        os.kill(os.getpid(), signum)
