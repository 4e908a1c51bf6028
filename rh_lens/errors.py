"""One family for every error a user can cause: bad input, a missing file, a model that
cannot load, a run directory in use.

`rh-lens` prints an `RhLensError` as one line and exits 1; anything else is a bug and
keeps its traceback. Library callers can catch `RhLensError` to handle all of them. Each
message says what is wrong and, where there is one, what to do, in one line.
"""

from __future__ import annotations


class RhLensError(Exception):
    """A problem with the user's input or environment (never a bug in rh_lens)."""


class InputError(RhLensError, ValueError):
    """A bad argument or input file: needles, haystack, heads, options."""


class ModelLoadError(RhLensError):
    """A model could not be loaded; the message says why and what to do."""


class TrialError(InputError):
    """A trial that cannot be scored honestly (answer not found, prompt too long, ...)."""


class PairError(InputError):
    """A clean/corrupted patching pair that does not differ only in the answer tokens."""


class ResultsFileError(InputError):
    """A results file that cannot be read: missing, not JSON, or not a format rh_lens knows."""


class OutputError(RhLensError):
    """An output that cannot be written (read-only file system, disk full, no permission)."""


class RunDirectoryError(OutputError):
    """An output directory this run may not use: in use by another run, not empty, or
    holding a run of other settings."""
