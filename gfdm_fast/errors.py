"""Errors a user can cause: the CLI prints their message, without a traceback."""


class UserError(ValueError):
    """Bad input, missing file or mismatched checkpoint; the message names the fix."""
