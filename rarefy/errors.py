"""User-facing errors.

Anything a user can cause (a missing file, a bad option, an unsupported format)
raises `RarefyError`; the CLI prints its message alone and exits non-zero.
Programming errors stay ordinary exceptions so their tracebacks survive.
"""


class RarefyError(Exception):
    """An error caused by user input, reported as one clear line."""
