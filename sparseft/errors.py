"""The error types every layer shares (a leaf: it imports nothing of sparseft's).

`SparseftError` is the base of every error sparseft raises on purpose about what the user gave
it: a bad option or argument, a file or data that does not fit, a run that diverged. The command
line prints those as one line (exit 1; `UsageError` exit 2); any other exception is a bug and
keeps its traceback. Each layer keeps its specific errors (`DataError` in `sparseft.data`,
`DeltaFileError` in `sparseft.deltafile`, ...), derived from these; they keep their ValueError or
RuntimeError base, so callers that catch those still do.
"""

from __future__ import annotations


class SparseftError(Exception):
    """Base of the errors sparseft raises about the user's input (one line from the CLI, not a bug)."""


class InputError(SparseftError, ValueError):
    """A bad value: an option or argument out of range, data or a file that does not fit the task."""


class UsageError(SparseftError):
    """A command line that parses but asks for something impossible (exit status 2)."""


class DataWarning(UserWarning):
    """Bad input that was skipped because the caller asked for `on_error="skip"` (the CLI shows it as one line)."""


class TrainingWarning(UserWarning):
    """A run that finished with a result that looks unusable (e.g. one class for everything; the CLI shows one line)."""
