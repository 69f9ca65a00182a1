"""Dataset readers for the research pipelines: JSONL, JSON list and CSV files checked against a schema.

A pipeline declares what one case looks like (:class:`Schema`: required fields, their types, allowed
values, paths that must exist under a root folder). :func:`read_dataset` reads the file and returns
the valid cases plus the invalid ones, each invalid case with an error naming the file, the line (JSONL,
CSV) or list index (JSON), the field and what was expected, so one bad row never hides the others.
Problems with the file as a whole (missing, not a JSON list, no cases at all) raise :class:`DatasetError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "CaseError", "DatasetError", "Field", "InvalidCase", "Dataset", "Schema", "read_dataset"]

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list", dict: "an object"}


class DatasetError(ValueError):
    """The dataset file as a whole cannot be used (missing, unreadable, wrong container, empty)."""


class CaseError(ValueError):
    """One case of a dataset is malformed; the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class Field:
    """One field of a case: its type(s), whether it is required, allowed values, and whether it is a path.

    ``path=True``: the value is a file path, relative to the dataset's root unless absolute, that must
    exist. ``check`` returns an error message (what was expected) or None for extra per-value checks.
    """

    name: str
    type: type | tuple[type, ...] = str
    required: bool = True
    choices: Sequence[Any] | None = None
    path: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""

    @property
    def types(self) -> tuple[type, ...]:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def expected(self) -> str:
        """What a valid value looks like, in words (for error messages)."""
        text = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in self.types)
        if self.choices is not None:
            text += f" in {list(self.choices)}"
        if self.path:
            text += " (a path to an existing file, relative to the dataset root)"
        return text


@dataclass(frozen=True)
class Schema:
    """What one case of a pipeline's dataset holds.

    ``id_field`` names the field holding a unique case id; when None (or absent in a row) the id is
    ``case-<row number>`` (the 1-based line of a JSONL/CSV file, the 0-based index of a JSON list).
    ``validate`` checks a whole case (cross-field rules) and raises ``ValueError`` with what is wrong.
    """

    fields: tuple[Field, ...]
    id_field: str | None = "id"
    validate: Callable[[dict[str, Any]], None] | None = None

    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]


@dataclass(frozen=True)
class Case:
    """One valid case: its id, its row in the dataset (0-based order), its fields, and where it came from.

    ``paths`` maps each path field to the absolute file it resolved to.
    """

    id: str
    index: int
    data: dict[str, Any]
    source: str
    paths: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """The resolved, existing file of path field ``name``."""
        return Path(self.paths[name])


@dataclass(frozen=True)
class InvalidCase:
    """A row that failed to parse or validate; recorded as a failed case, never silently dropped."""

    id: str
    index: int
    source: str
    error: CaseError


@dataclass
class Dataset:
    """The valid and invalid cases of one dataset file, in file order, with the file's SHA-256."""

    path: str | None
    format: str
    root: str
    sha256: str
    cases: list[Case]
    invalid: list[InvalidCase]

    def __len__(self) -> int:
        return len(self.cases) + len(self.invalid)

    def rows(self) -> list[Case | InvalidCase]:
        """Every row, valid or not, in dataset order."""
        return sorted([*self.cases, *self.invalid], key=lambda c: c.index)


# ------------------------------------------------------------------------------------------ reading
def read_dataset(
    source: str | Path | Sequence[Mapping[str, Any]],
    schema: Schema,
    root: str | Path | None = None,
    format: str | None = None,
) -> Dataset:
    """Read and check a dataset: a JSONL / JSON-list / CSV file, or an in-memory list of dicts.

    ``root`` is where relative paths point (default: the dataset file's folder, or the current folder for
    an in-memory list); ``format`` is ``"jsonl"``, ``"json"`` or ``"csv"`` (default: from the suffix).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            hint = " It is a folder; pass the annotations file inside it." if path.is_dir() else ""
            raise DatasetError(f"Dataset file {path} does not exist.{hint} Check the path (or generate a dataset first).")
        fmt = format or FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DatasetError(f"Cannot tell the format of {path} from its suffix; use .jsonl, .json or .csv, or pass format=.")
        raw = path.read_bytes()
        rows = _parse(path, raw, fmt)
        base = Path(root) if root is not None else path.parent
        where, digest = str(path), hashlib.sha256(raw).hexdigest()
    else:
        fmt, where = "records", "<records>"
        rows = [(i, r if isinstance(r, Mapping) else _not_object(where, i, r)) for i, r in enumerate(source)]
        base = Path(root) if root is not None else Path.cwd()
        digest = hashlib.sha256(json.dumps(list(source), sort_keys=True, default=str).encode()).hexdigest()
    if not rows:
        raise DatasetError(f"Dataset {where} holds no cases; add at least one {fmt} record with fields {schema.field_names()}.")
    cases, invalid, seen, bad_ids = [], [], {}, set()
    for order, (row_no, row) in enumerate(rows):
        label = _label(where, fmt, row_no)
        case_id = _case_id(schema, row, row_no)
        try:
            if isinstance(row, CaseError):
                raise row
            data, paths = _check_row(schema, row, label, base, fmt == "csv")
            if case_id in seen:
                raise CaseError(f"{label}: duplicate case id {case_id!r} (first at {seen[case_id]}); case ids must be unique.")
            seen[case_id] = label
            cases.append(Case(case_id, order, data, label, paths))
        except CaseError as err:
            if case_id in seen or case_id in bad_ids:
                case_id = f"{case_id}@{row_no}"
            bad_ids.add(case_id)
            invalid.append(InvalidCase(case_id, order, label, err))
    return Dataset(str(source) if fmt != "records" else None, fmt, str(base.resolve()), digest, cases, invalid)


def _not_object(where: str, i: int, row: Any) -> CaseError:
    return CaseError(f"{where} item {i}: expected a JSON object (dict), got {type(row).__name__}.")


def _label(where: str, fmt: str, row_no: int) -> str:
    if fmt in ("jsonl", "csv"):
        return f"{where}:{row_no}" if fmt == "jsonl" else f"{where} row {row_no} (line {row_no + 1})"
    return f"{where} item {row_no}"


def _case_id(schema: Schema, row: Any, row_no: int) -> str:
    if schema.id_field and isinstance(row, Mapping):
        value = row.get(schema.id_field)
        if value not in (None, "") and isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return f"case-{row_no}"


def _parse(path: Path, raw: bytes, fmt: str) -> list[tuple[int, Any]]:
    """(row number, parsed object or CaseError) per record; row numbers are 1-based lines for JSONL / CSV."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err}); save it as UTF-8.") from None
    if fmt == "jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                obj = CaseError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno}); each line must be one JSON object.")
            else:
                if not isinstance(obj, dict):
                    obj = CaseError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}.")
            rows.append((line_no, obj))
        return rows
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg}).") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of case objects at the top level, got {type(data).__name__}.")
        return [(i, obj if isinstance(obj, dict) else _not_object(str(path), i, obj)) for i, obj in enumerate(data)]
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row_no, row in enumerate(reader, start=1):
            if None in row:
                rows.append((row_no, CaseError(f"{path} row {row_no} (line {reader.line_num}): more values than header columns {reader.fieldnames}.")))
                continue
            rows.append((row_no, {k: v for k, v in row.items() if v is not None}))
        return rows
    raise DatasetError(f"Unknown dataset format {fmt!r}; use 'jsonl', 'json' or 'csv'.")


def _check_row(schema: Schema, row: Mapping[str, Any], label: str, root: Path, from_csv: bool) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = dict(row)
    paths: dict[str, str] = {}
    for f in schema.fields:
        value = row.get(f.name)
        if value is None or (from_csv and value == ""):
            if f.required:
                raise CaseError(f"{label}: missing required field {f.name!r} (expected {f.expected()}).")
            data[f.name] = f.default
            continue
        if from_csv:
            value = _from_csv_text(value, f, label)
        if not _has_type(value, f.types):
            raise CaseError(f"{label}: field {f.name!r} is {value!r} ({type(value).__name__}); expected {f.expected()}.")
        if float in f.types and isinstance(value, float) and not math.isfinite(value):
            raise CaseError(f"{label}: field {f.name!r} is {value}; expected a finite number.")
        if f.choices is not None and value not in f.choices:
            raise CaseError(f"{label}: field {f.name!r} is {value!r}; expected one of {list(f.choices)}.")
        if f.check is not None and (problem := f.check(value)):
            raise CaseError(f"{label}: field {f.name!r} is {value!r}; expected {problem}.")
        if f.path:
            resolved = (root / value) if not Path(value).is_absolute() else Path(value)
            if not resolved.is_file():
                raise CaseError(f"{label}: field {f.name!r} points to {resolved}, which does not exist; fix the path (relative to {root}) or add the file.")
            paths[f.name] = str(resolved.resolve())
        data[f.name] = value
    if schema.validate is not None:
        try:
            schema.validate(data)
        except ValueError as err:
            raise CaseError(f"{label}: {err}") from None
    return data, paths


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _from_csv_text(text: str, f: Field, label: str) -> Any:
    """A CSV cell converted to the field's type (CSV holds only text)."""
    types = f.types
    if str in types:
        return text
    try:
        if bool in types and text.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.strip().lower() in ("true", "1", "yes")
        if int in types and text.strip().lstrip("+-").isdigit():
            return int(text)
        if float in types:
            return float(text)
        if list in types or dict in types:
            return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        pass
    raise CaseError(f"{label}: field {f.name!r} is {text!r}; expected {f.expected()}.")
