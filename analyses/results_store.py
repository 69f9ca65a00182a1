"""Crash-safe, resumable storage for sweep results: one row per finished cell, beside a manifest.

Long sweeps (patching, tracing, knockout) must never lose finished work. A :class:`CellStore` is a
directory holding

* ``manifest.json`` -- the exact configuration of the sweep (JSON) and which columns identify a
  cell (``key_columns``);
* ``cells/part-*.parquet`` (or ``.csv``) -- immutable part files, each written to a temporary name
  in the same directory and then moved into place with :func:`os.replace`, which is atomic on POSIX
  file systems. A process killed mid-write leaves only a ``.tmp`` file, which is ignored and cleaned
  up on the next open; a part file that exists is always complete.

Rerunning the same sweep against the same directory resumes: :meth:`CellStore.done_keys` tells the
caller which cells to skip, :meth:`CellStore.append` silently drops records whose key is already
stored (so a resumed run cannot write duplicates), and :meth:`CellStore.load` de-duplicates once
more on read in case two writers raced. Opening a store with a different configuration raises
:class:`ConfigMismatchError` naming the differing keys, instead of mixing results of two sweeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from hooked_vlm.atomic_files import atomic_write_text

__all__ = ["CellStore", "ConfigMismatchError", "canonical_config", "config_hash"]

MANIFEST = "manifest.json"
CELLS = "cells"
FORMAT_VERSION = 1


class ConfigMismatchError(ValueError):
    """The directory already holds a sweep with a different configuration."""


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` as plain JSON types (tuples -> lists, numpy scalars -> Python, others -> str).

    The manifest stores this form, and two configurations are "the same sweep" iff their canonical
    forms are equal.
    """
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (first 16 hex digits)."""
    text = json.dumps(canonical_config(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def _canon_value(v: Any) -> Any:
    """Normalise one key value so that a value survives a Parquet/CSV round trip unchanged.

    ``None``/NaN -> None; numpy scalars -> Python; integral floats -> int (a ``head`` column holding
    ``None`` for whole-layer sites is read back as float64).
    """
    if v is None:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            return int(v)
    return v


def _canon_key(values: Iterable[Any]) -> tuple:
    return tuple(_canon_value(v) for v in values)


class CellStore:
    """A directory of finished sweep cells plus the manifest of the sweep that produced them.

    Args:
        directory: where the store lives (created if missing).
        config: the sweep's exact configuration; must be JSON-serialisable after
            :func:`canonical_config`. Stored in ``manifest.json`` on first open and compared on every
            later open.
        key_columns: the record fields that identify a cell (e.g. ``("site", "layer", "head",
            "group")``). Every appended record must contain them.
        format: ``"parquet"`` (default) or ``"csv"``.
        overwrite: delete existing parts and manifest when the configuration differs, instead of
            raising :class:`ConfigMismatchError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        config: Mapping[str, Any],
        key_columns: Sequence[str],
        format: Literal["parquet", "csv"] = "parquet",
        overwrite: bool = False,
    ) -> None:
        if format not in ("parquet", "csv"):
            raise ValueError(f"format must be 'parquet' or 'csv', got {format!r}")
        if not key_columns:
            raise ValueError("key_columns must name at least one column")
        self.directory = Path(directory)
        self.format = format
        self.key_columns = tuple(key_columns)
        self.config = canonical_config(config)
        self.cells_dir = self.directory / CELLS
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        self._open_manifest(overwrite)
        self._done: set[tuple] = set(self._read_keys())

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config_hash": config_hash(self.config),
            "key_columns": list(self.key_columns),
            "format": self.format,
            "config": self.config,
        }

    def _open_manifest(self, overwrite: bool) -> None:
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            same = (
                old.get("config") == self.config
                and old.get("key_columns") == list(self.key_columns)
                and old.get("format") == self.format
            )
            if same:
                return
            if not overwrite:
                raise ConfigMismatchError(self._describe_mismatch(old))
            for part in self._parts():
                part.unlink()
        self._atomic_write_text(self.manifest_path, json.dumps(self._manifest(), indent=2, sort_keys=True))

    def _describe_mismatch(self, old: Mapping[str, Any]) -> str:
        old_cfg = old.get("config", {}) or {}
        keys = sorted(set(old_cfg) | set(self.config))
        differing = [k for k in keys if old_cfg.get(k, "<missing>") != self.config.get(k, "<missing>")]
        extra = []
        if old.get("key_columns") != list(self.key_columns):
            extra.append(f"key_columns {old.get('key_columns')} != {list(self.key_columns)}")
        if old.get("format") != self.format:
            extra.append(f"format {old.get('format')!r} != {self.format!r}")
        detail = ", ".join([f"config[{k!r}]" for k in differing] + extra)
        return (
            f"{self.directory} already holds results of a different sweep (differs in: {detail}). "
            "Use a new directory, or pass overwrite=True to discard the old results."
        )

    # ------------------------------------------------------------------ parts
    def _suffix(self) -> str:
        return ".parquet" if self.format == "parquet" else ".csv"

    def _parts(self) -> list[Path]:
        return sorted(p for p in self.cells_dir.glob(f"part-*{self._suffix()}") if p.is_file())

    def _clean_tmp(self) -> None:
        for tmp in self.cells_dir.glob(".tmp-*"):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _atomic_write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)
        self._fsync_dir(path.parent)

    def _write_frame(self, path: Path, frame: pd.DataFrame) -> None:
        if self.format == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)

    def _read_part(self, path: Path) -> pd.DataFrame:
        if self.format == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)

    def _read_keys(self) -> Iterable[tuple]:
        for part in self._parts():
            frame = self._read_part(part)
            missing = [c for c in self.key_columns if c not in frame.columns]
            if missing:
                raise ValueError(f"part file {part} lacks key columns {missing}")
            for row in frame[list(self.key_columns)].itertuples(index=False, name=None):
                yield _canon_key(row)

    # ------------------------------------------------------------------ public API
    def key_of(self, record: Mapping[str, Any]) -> tuple:
        """The canonical key tuple of one record (or of a cell description with the key fields)."""
        try:
            return _canon_key(record[c] for c in self.key_columns)
        except KeyError as e:
            raise KeyError(f"record lacks key column {e.args[0]!r}; key columns are {self.key_columns}") from None

    def done_keys(self) -> set[tuple]:
        """Canonical keys of every stored cell."""
        return set(self._done)

    def is_done(self, record: Mapping[str, Any]) -> bool:
        """Whether the cell identified by ``record``'s key fields is already stored."""
        return self.key_of(record) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Atomically store finished cells as one new part file; returns how many were written.

        Records whose key is already stored (or repeated within ``records``) are dropped, so a
        resumed sweep never writes duplicates.
        """
        fresh: list[Mapping[str, Any]] = []
        seen: set[tuple] = set()
        for rec in records:
            key = self.key_of(rec)
            if key in self._done or key in seen:
                continue
            seen.add(key)
            fresh.append(rec)
        if not fresh:
            return 0
        frame = pd.DataFrame([dict(r) for r in fresh])
        name = f"part-{_now_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{self._suffix()}"
        final = self.cells_dir / name
        tmp = self.cells_dir / f".tmp-{name}"
        self._write_frame(tmp, frame)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._fsync_dir(self.cells_dir)
        self._done |= seen
        return len(fresh)

    def load(self) -> pd.DataFrame:
        """All stored cells as one DataFrame, de-duplicated by key (first write wins)."""
        parts = self._parts()
        if not parts:
            return pd.DataFrame(columns=list(self.key_columns))
        frame = pd.concat([self._read_part(p) for p in parts], ignore_index=True)
        keys = [_canon_key(r) for r in frame[list(self.key_columns)].itertuples(index=False, name=None)]
        dup = pd.Series([repr(k) for k in keys]).duplicated().to_numpy()
        return frame.loc[~dup].reset_index(drop=True)

    def consolidate(self) -> None:
        """Merge all parts into one part file (atomic write first, then removal of the old parts).

        A crash between the two steps leaves duplicates on disk, which :meth:`load` removes.
        """
        parts = self._parts()
        if len(parts) <= 1:
            return
        frame = self.load()
        name = f"part-{_now_ns():020d}-{os.getpid()}-merged{self._suffix()}"
        tmp = self.cells_dir / f".tmp-{name}"
        self._write_frame(tmp, frame)
        os.replace(tmp, self.cells_dir / name)
        self._fsync_dir(self.cells_dir)
        for p in parts:
            p.unlink()


def _now_ns() -> int:
    import time

    return time.time_ns()
