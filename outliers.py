"""
Skip a step's update when its loss or grad norm is an outlier: a z-score above `z` over the last 128 steps.
A single bad batch (a spike in loss or gradient) then costs one step instead of knocking the weights off
course. This follows llm.c's llmc/outlier_detector.h and its use in train_gpt2.cu (`-sl 7.0 -sg 7.0`): the
z of the newest value over a window of the last 128 values that includes it, population std, nothing until
128 values came before it, 0 for a constant window, one-sided (only a rise skips), loss checked before grad
norm, and both windows take every step's values, a skipped step's too. Unlike llm.c, a non-finite value is
skipped and kept out of the windows (in llm.c's running sums it would turn every later z into nan, which
turns the checks off for the rest of the run), and the windows go into checkpoints (llm.c starts them empty
on resume), so a resumed run skips exactly the steps an uninterrupted one would.
"""
import math
from collections import deque

from errors import UsageError
from run_checks import find_checkpoint

WINDOW = 128


class OutlierDetector:
    def __init__(self):
        self.window = deque(maxlen=WINDOW)  # the last WINDOW values, oldest first

    def update(self, value):
        """Put `value` in the window; its z-score over the window (it included), or None while fewer than
        WINDOW values came before it (llm.c returns nan for the first 128)."""
        value = float(value)
        full = len(self.window) == WINDOW
        self.window.append(value)  # a full deque drops its oldest
        if not full:
            return None
        # exact mean and std of the window, where llm.c keeps running sums: the same decisions, without
        # their rounding drift and E[x^2]-mean^2 cancellation (fsum: a constant window's std is exactly 0)
        mean = math.fsum(self.window) / WINDOW
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.window) / WINDOW)
        return 0.0 if std == 0.0 else (value - mean) / std


class SkipOutliers:
    def __init__(self, z):
        self.z = z  # skip when a z-score is above this (llm.c's run_gpt3_125M.sh: 7.0)
        self.loss = OutlierDetector()
        self.norm = OutlierDetector()  # the grad norm before clipping, as llm.c

    def check(self, loss, norm):
        """The reason to skip this step's update, or None to apply it. Both windows take their value first,
        whatever the other says; a reason for the loss comes before one for the norm."""
        reasons = []
        for name, detector, value in (("loss", self.loss, loss), ("grad norm", self.norm, norm)):
            value = float(value)
            if not math.isfinite(value):
                reasons.append(f"{name} {value} is not finite")
                continue
            z = detector.update(value)
            if z is not None and z > self.z:
                reasons.append(f"{name} z-score {z:.2f} > {self.z:g}")
        return reasons[0] if reasons else None

    def state_dict(self):
        # plain lists of floats: torch.load(weights_only=True) reads them back
        return {"loss": list(self.loss.window), "norm": list(self.norm.window)}

    def load_state_dict(self, state):
        self.loss.window = deque(map(float, state["loss"]), maxlen=WINDOW)
        self.norm.window = deque(map(float, state["norm"]), maxlen=WINDOW)


def step_skipped(loss, norm, scaler, step, log_dir):
    """Why GradScaler skipped this step (its norm is inf/nan: an fp16 overflow, routine), None if it did not,
    or a UsageError if the run diverged (a non-finite loss, scaler or not)."""
    skipped = scaler is not None and math.isfinite(loss) and not math.isfinite(norm)
    if not skipped and not (math.isfinite(loss) and math.isfinite(norm)):
        raise UsageError(f"loss {loss} / grad norm {norm} is not finite at step {step}; "
                         f"lower --max_lr, check the data, or --skip_outliers 7. The last good checkpoint is "
                         f"intact: {find_checkpoint(log_dir)}")
    return "inf/nan fp16 gradients, the loss scale is halved" if skipped else None
