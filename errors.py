"""The one error type of every script here: bad input from the user, printed as one line that names the fix."""


class UsageError(Exception):
    """Bad input from the user: every script prints it as one line and exits non-zero."""
