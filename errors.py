"""The error types of every script here: bad input, printed as one line that names the fix."""


class UsageError(Exception):
    """Bad input from the user: every script prints it as one line and exits non-zero. every_rank: all ranks
    of a torchrun group raised it together (ranks.py), and rank 0 alone prints it."""

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


class CorruptCheckpoint(UsageError):
    """A checkpoint file that does not load, perhaps cut short by a host crash: --resume goes on from the one
    before it."""
