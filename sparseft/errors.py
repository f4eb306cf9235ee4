"""Exception and warning types that several layers need (a leaf: it imports nothing of sparseft's).

Each layer keeps its own specific errors (`DataError` in `sparseft.data`, `DeltaFileError` in
`sparseft.deltafile`, ...); what is here is shared by modules that must not import one another.
"""

from __future__ import annotations


class UsageError(Exception):
    """A command line that parses but asks for something impossible (exit status 2)."""


class DataWarning(UserWarning):
    """Bad input that was skipped because the caller asked for `on_error="skip"` (the CLI shows it as one line)."""
