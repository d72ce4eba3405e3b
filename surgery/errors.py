"""The one error type `surgery` shows users: a one-line message, exit code 2, no traceback."""


class SurgeryError(Exception):
    """A user mistake or unusable input; the message names the problem and the fix."""
