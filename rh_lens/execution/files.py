"""Files every part writes: atomic writes (never a truncated file, never through a symlink) and JSON."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rh_lens.errors import OutputError, ResultsFileError


def write_atomic(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write a file through `write(file object)` atomically: into a temporary file beside it,
    then renamed over `path`. A run killed mid-write never leaves a truncated file, and a
    symlink at `path` is replaced, never followed (nothing outside the output directory is
    written). The file gets the usual mode (0666 less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: json.dump(data, f))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a `ResultsFileError`
    that names it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultsFileError(f"{path} is a directory, not a {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsFileError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; truncated?)") from None
