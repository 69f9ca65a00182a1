"""The shared case runner: every research pipeline is a schema, a model loader and a per-case function.

:func:`run_pipeline` reads and checks the dataset, loads the model once (per Ray worker when ``workers``
or ``ray_address`` is set), runs each case, and stores each finished case at once as an atomic part file
of a :class:`~analyses.results_store.CellStore` under ``output_dir/cases`` (failures, with error type and
message, under ``output_dir/failures``). A rerun skips the stored cases, so a killed run resumes with the
same final table and no duplicates. ``output_dir/manifest.json`` records the configuration, command
line, package versions, model fingerprint, timings and counts, rewritten atomically.

Each case runs with its own seed, derived from ``seed`` and the case id, so results do not depend on
the order cases run in, or on which worker runs them: the serial and the Ray run give the same table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.pipelines.datasets import Case, Dataset, InvalidCase, Schema, read_dataset
from analyses.pipelines.provenance import atomic_write_json, model_fingerprint, package_versions, plain, resolve_device, resolve_dtype
from analyses.results_store import CellStore, ConfigMismatchError

__all__ = [
    "CaseContext", "CaseFailedError", "ModelSpec", "Pipeline", "RunConfig", "RunSummary",
    "case_seed", "load_failures", "load_results", "run_pipeline",
]

RESERVED = ("case_id", "case_index", "case_sha")
CASES, FAILURES, MANIFEST = "cases", "failures", "manifest.json"
#: a finished run merges its one-part-per-case files into one when there are more than this many
CONSOLIDATE_ABOVE = 200


class CaseFailedError(RuntimeError):
    """A case failed under ``strict=True`` (the failure is recorded before this is raised)."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a model name (built-in tiny model, organism, checkpoint folder), device, dtype, seed."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


def load_hooked_model(spec: ModelSpec) -> Any:
    """The default loader: ``hooked_vlm.cli.load_model`` (tiny name, checkpoint folder or hub id) -> LoadedModel."""
    from hooked_vlm.cli import load_model

    return load_model(spec.name, spec.torch_dtype, spec.device, spec.seed)


@dataclass(frozen=True)
class Pipeline:
    """A research pipeline as the runner sees it.

    ``run_case(model, case, ctx) -> dict`` computes one case's record (flat: scalars, strings, lists;
    tensors and arrays become lists, dicts JSON text). ``load_model(spec)`` builds what ``run_case`` receives as
    ``model`` (once per process / Ray worker). ``version`` is stored with the results: bump it when the
    per-case computation changes, so old results are not resumed into new ones. For Ray, both functions
    must be importable module-level functions (or picklable objects).
    """

    name: str
    schema: Schema
    run_case: Callable[[Any, Case, "CaseContext"], Mapping[str, Any]]
    load_model: Callable[[ModelSpec], Any] = load_hooked_model
    version: str = "1"


@dataclass
class RunConfig:
    """How to run: the model, device, dtype, seed, case limit, workers, strictness, resume/overwrite.

    ``options`` are the pipeline's own settings (JSON-serialisable); they are part of the stored
    configuration, so resuming with other options is refused (use a new folder or ``overwrite``).
    ``workers`` > 0 or ``ray_address`` runs cases on Ray; ``threads`` sets torch's intra-op threads in
    every process that runs cases (None: leave as is).
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    limit: int | None = None
    workers: int = 0
    ray_address: str | None = None
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError naming the bad setting and the fix."""
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of cases, got {self.limit}; omit it to run every case.")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = run in this process), got {self.workers}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}.")
        resolve_dtype(self.dtype)
        json.dumps(self.options, default=str)


@dataclass(frozen=True)
class CaseContext:
    """What a case function gets besides the model and the case: device, dtype, its seed and RNG, options."""

    device: str
    dtype: torch.dtype
    seed: int
    rng: np.random.Generator
    options: Mapping[str, Any]
    output_dir: Path


@dataclass
class RunSummary:
    """Where the run wrote, what it counted, and its manifest; ``results()`` / ``failures()`` read the tables."""

    output_dir: Path
    counts: dict[str, int]
    manifest: dict[str, Any]

    def results(self) -> pd.DataFrame:
        return load_results(self.output_dir)

    def failures(self) -> pd.DataFrame:
        return load_failures(self.output_dir)


# ------------------------------------------------------------------------------------------ per case
def case_seed(seed: int, case_id: str) -> int:
    """The seed of one case: a hash of the run seed and the case id (independent of order and worker)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:4], "little")


def _case_sha(case: Case) -> str:
    return hashlib.sha256(json.dumps(case.data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def execute_case(pipeline: Pipeline, model: Any, case: Case, spec: ModelSpec, options: Mapping[str, Any], output_dir: str) -> dict[str, Any]:
    """Run one case with its own seed; return ``{"ok": True, "record": ...}`` or the error (never raises)."""
    seed = case_seed(spec.seed, case.id)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ctx = CaseContext(spec.device, spec.torch_dtype, seed, np.random.default_rng(seed), options, Path(output_dir))
    try:
        out = pipeline.run_case(model, case, ctx)
        if not isinstance(out, Mapping):
            raise TypeError(f"pipeline {pipeline.name!r}: run_case must return a dict of record fields, got {type(out).__name__}.")
        clash = [k for k in out if k in RESERVED]
        if clash:
            raise ValueError(f"pipeline {pipeline.name!r}: run_case returned reserved field(s) {clash}; rename them.")
        record = {"case_id": case.id, "case_index": case.index, "case_sha": _case_sha(case)}
        record.update({str(k): plain(v) for k, v in out.items()})
        return {"ok": True, "case_id": case.id, "record": record}
    except Exception as err:  # noqa: BLE001 - one bad case must not stop the others; recorded with its type
        return {"ok": False, "case_id": case.id, "failure": _failure(case.id, case.index, case.source, "run", err)}


def _failure(case_id: str, index: int, source: str, stage: str, err: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-6:])
    return {"case_id": case_id, "case_index": index, "source": source, "stage": stage,
            "error_type": type(err).__name__, "message": str(err), "traceback": tb}


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


class CaseWorker:
    """Loads the model once and runs cases with it: the serial path, and each Ray actor."""

    def __init__(self, pipeline: Pipeline, spec: ModelSpec, options: Mapping[str, Any], output_dir: str, threads: int | None) -> None:
        _set_threads(threads)
        self.pipeline, self.spec, self.options, self.output_dir = pipeline, spec, dict(options), output_dir
        torch.manual_seed(spec.seed)
        self.model = pipeline.load_model(spec)
        self.loaded_pid = os.getpid()

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def pid(self) -> int:
        return self.loaded_pid

    def run(self, case: Case) -> dict[str, Any]:
        return execute_case(self.pipeline, self.model, case, self.spec, self.options, self.output_dir)


# ------------------------------------------------------------------------------------------ stores
def _stores(out: Path, store_config: Mapping[str, Any], overwrite: bool) -> tuple[CellStore, CellStore]:
    if overwrite:  # start over even when the configuration is the same
        for sub in (CASES, FAILURES):
            shutil.rmtree(out / sub, ignore_errors=True)
    try:
        cases = CellStore(out / CASES, store_config, key_columns=("case_id",), overwrite=overwrite)
        failures = CellStore(out / FAILURES, store_config, key_columns=("case_id", "run_id"), overwrite=overwrite)
    except ConfigMismatchError as err:
        raise ConfigMismatchError(f"{err} (command line: pass --overwrite, or choose another --output-dir)") from None
    return cases, failures


def _open_existing(directory: Path, key_columns: Sequence[str]) -> CellStore | None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    return CellStore(directory, json.loads(manifest.read_text())["config"], key_columns=key_columns)


def load_results(output_dir: str | os.PathLike) -> pd.DataFrame:
    """The finished cases of a run folder, one row per case, in dataset order."""
    store = _open_existing(Path(output_dir) / CASES, ("case_id",))
    if store is None:
        raise FileNotFoundError(f"{output_dir} holds no pipeline results ({CASES}/manifest.json missing); run the pipeline first.")
    frame = store.load()
    return frame.sort_values("case_index", kind="stable").reset_index(drop=True) if len(frame) else frame


def load_failures(output_dir: str | os.PathLike) -> pd.DataFrame:
    """The cases whose latest attempt failed (and that have no result), with error type and message."""
    store = _open_existing(Path(output_dir) / FAILURES, ("case_id", "run_id"))
    columns = ["case_id", "case_index", "source", "stage", "error_type", "message", "traceback", "run_id", "finished_at"]
    if store is None or len(store) == 0:
        return pd.DataFrame(columns=columns)
    frame = store.load().sort_values("finished_at", kind="stable").drop_duplicates("case_id", keep="last")
    results = Path(output_dir) / CASES
    done = set(load_results(output_dir)["case_id"]) if (results / "manifest.json").is_file() else set()
    frame = frame[~frame["case_id"].isin(done)]
    return frame.sort_values("case_index", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ the run
def run_pipeline(
    pipeline: Pipeline,
    dataset: str | os.PathLike | Sequence[Mapping[str, Any]] | Dataset,
    output_dir: str | os.PathLike,
    config: RunConfig,
    argv: Sequence[str] | None = None,
) -> RunSummary:
    """Run ``pipeline`` on every case of ``dataset`` (up to ``config.limit``), resumably, into ``output_dir``.

    Returns the counts of this run: ``done`` (computed now), ``failed`` (invalid rows + failed cases),
    ``skipped`` (already stored by an earlier run), ``selected`` (rows considered) and ``total`` (rows
    in the dataset). Raises :class:`CaseFailedError` on the first failure when ``config.strict``.
    """
    config.check()
    out = Path(output_dir)
    started, t0 = _now(), time.perf_counter()
    spec = ModelSpec(config.model, _run_device(config), config.dtype, config.seed)
    data = dataset if isinstance(dataset, Dataset) else read_dataset(dataset, pipeline.schema, root=config.root)
    rows = data.rows()[: config.limit] if config.limit else data.rows()
    invalid = [r for r in rows if isinstance(r, InvalidCase)]
    if config.strict and invalid:
        raise CaseFailedError(f"{invalid[0].error} (strict: fix the dataset, or run without --strict to record it and go on).")
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"{started.replace(':', '').replace('-', '')}-{uuid.uuid4().hex[:6]}"
    manifest: dict[str, Any] = {
        "pipeline": pipeline.name, "pipeline_version": pipeline.version, "run_id": run_id, "status": "running",
        "config": asdict(config), "model": asdict(spec), "command_line": list(argv if argv is not None else sys.argv),
        "versions": package_versions(), "cwd": os.getcwd(), "started_at": started,
        "dataset": {"path": data.path, "format": data.format, "root": data.root, "sha256": data.sha256, "rows": len(data)},
    }
    previous = out / MANIFEST
    if previous.is_file() and not config.overwrite:
        old = json.loads(previous.read_text())
        manifest["previous_runs"] = old.get("previous_runs", []) + [{k: old.get(k) for k in ("run_id", "status", "started_at", "finished_at", "counts")}]
    counts = {"total": len(data), "selected": len(rows), "done": 0, "failed": 0, "skipped": 0}
    manifest["counts"] = counts
    executor = _Executor(pipeline, spec, config, out)
    owns_folder = False  # the manifest is written only once the folder's results are ours to extend
    try:
        fingerprint = executor.start()
        manifest["model"]["fingerprint"] = fingerprint
        store_config = {"pipeline": pipeline.name, "pipeline_version": pipeline.version, "model": spec.name,
                        "model_fingerprint": fingerprint, "dtype": spec.dtype, "seed": spec.seed, "options": config.options}
        results, failures = _stores(out, store_config, config.overwrite)
        _check_unchanged(results, [r for r in rows if isinstance(r, Case)])
        owns_folder = True
        atomic_write_json(out / MANIFEST, manifest)
        _record_invalid(failures, invalid, run_id, counts)
        todo = [r for r in rows if isinstance(r, Case) and not results.is_done({"case_id": r.id})]
        counts["skipped"] = sum(isinstance(r, Case) for r in rows) - len(todo)
        _run_cases(executor, todo, results, failures, run_id, counts, config, pipeline.name)
        for store in (results, failures):
            if len(list(store.cells_dir.glob("part-*"))) > CONSOLIDATE_ABOVE:
                store.consolidate()  # one file instead of one per case; crash-safe (load de-duplicates)
        manifest["status"] = "finished"
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        raise
    except BaseException as err:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        executor.stop()
        manifest["finished_at"] = _now()
        manifest["elapsed_s"] = round(time.perf_counter() - t0, 3)
        manifest["workers"] = executor.describe()
        if owns_folder:
            atomic_write_json(out / MANIFEST, manifest)
    return RunSummary(out, counts, manifest)


def _run_device(config: RunConfig) -> str:
    """The device cases run on: checked here for local runs; on Ray, CUDA is Ray's per-actor GPU (``cuda``)."""
    if (config.workers > 0 or config.ray_address is not None) and config.device.startswith("cuda"):
        return "cuda"  # the driver may have no GPU; Ray assigns one per actor (CUDA_VISIBLE_DEVICES)
    return resolve_device(config.device)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_unchanged(results: CellStore, cases: Sequence[Case]) -> None:
    """Refuse to resume when a stored case's input changed since it was computed."""
    if not len(results):
        return
    stored = results.load()
    sha_of = dict(zip(stored["case_id"].astype(str), stored["case_sha"]))
    changed = [c.id for c in cases if c.id in sha_of and sha_of[c.id] != _case_sha(c)]
    if changed:
        raise ConfigMismatchError(
            f"{len(changed)} case(s) changed in the dataset since they were computed (e.g. {changed[:3]}); "
            "pass --overwrite (overwrite=True) to recompute, or use another output folder."
        )


def _record_invalid(failures: CellStore, invalid: Sequence[InvalidCase], run_id: str, counts: dict[str, int]) -> None:
    records = []
    for row in invalid:
        rec = _failure(row.id, row.index, row.source, "validate", row.error)
        records.append(dict(rec, run_id=run_id, finished_at=_now()))
    failures.append(records)
    counts["failed"] += len(records)


def _run_cases(executor: "_Executor", todo: Sequence[Case], results: CellStore, failures: CellStore,
               run_id: str, counts: dict[str, int], config: RunConfig, name: str) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc=name, unit="case", disable=not config.progress) as bar:
        for outcome in executor.map(todo):
            if outcome["ok"]:
                results.append([outcome["record"]])
                counts["done"] += 1
            else:
                failure = dict(outcome["failure"], run_id=run_id, finished_at=_now())
                failures.append([failure])
                counts["failed"] += 1
                if config.strict:
                    raise CaseFailedError(
                        f"case {failure['case_id']!r} ({failure['source']}) failed: {failure['error_type']}: {failure['message']} "
                        "(strict; rerun without --strict to record failures and go on)."
                    )
            bar.update(1)
            bar.set_postfix(failed=counts["failed"])


class _Executor:
    """Runs cases in this process, or on Ray actors (one model per actor) when workers / an address are set."""

    def __init__(self, pipeline: Pipeline, spec: ModelSpec, config: RunConfig, out: Path) -> None:
        self.pipeline, self.spec, self.config, self.out = pipeline, spec, config, out
        self.use_ray = config.workers > 0 or config.ray_address is not None
        self.local: CaseWorker | None = None
        self.ray_run = None

    def start(self) -> str:
        """Load the model(s); return the model fingerprint (all workers must agree)."""
        args = (self.pipeline, self.spec, self.config.options, str(self.out.resolve()), self.config.threads)
        if not self.use_ray:
            self.local = CaseWorker(*args)
            return self.local.fingerprint()
        from analyses.pipelines.ray_backend import RayRun

        self.ray_run = RayRun(args, workers=self.config.workers, address=self.config.ray_address, device=self.spec.device)
        return self.ray_run.start()

    def map(self, cases: Sequence[Case]) -> Iterable[dict[str, Any]]:
        if self.local is not None:
            return (self.local.run(c) for c in cases)
        return self.ray_run.map(cases)

    def stop(self) -> None:
        if self.ray_run is not None:
            self.ray_run.stop()

    def describe(self) -> dict[str, Any]:
        if self.ray_run is not None:
            return self.ray_run.describe()
        return {"backend": "serial", "workers": 1}
