"""Atomic file writes: a temporary file beside the target, fsynced, then renamed, so a reader (or a resumed run
after a kill) never sees a half-written file. The one helper every writer in the library uses."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_output", "atomic_write_text", "atomic_write_json"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and replaces ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:12]}-{final.name}"
    try:
        yield tmp
        with open(tmp, "rb") as f:  # whatever wrote it (safetensors, pandas, ...) may not have synced
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would create it (safetensors writes 0600)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON values as ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
