"""Mutation check: inject each curated bug of ``tests/mutations/*.json`` and confirm its tests catch it.

Each mutation file is a JSON list of ``{"id", "file", "find", "replace", "tests", "why"}``: ``find`` must
occur exactly once in ``file``; ``tests`` are pytest node ids or paths. Every mutation is applied to a
temporary copy of the repository (the working tree is never touched) and only its tests run there, in a
subprocess with a timeout. A mutation is *caught* when those tests fail, *survived* when they pass, and
*error* when it cannot be applied or the run times out / collects nothing.

    python scripts/mutation_check.py                 # every file, one mutation at a time
    python scripts/mutation_check.py --jobs 2        # two mutations in parallel
    python scripts/mutation_check.py --only rope-w-off-by-one --only gemma3-scale
    python scripts/mutation_check.py --file tests/mutations/core.json

Exits non-zero when any mutation survives or errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATION_DIR = ROOT / "tests" / "mutations"
FIELDS = ("id", "file", "find", "replace", "tests", "why")
#: What the temporary copy leaves out: virtual environments, caches and version control.
IGNORE = shutil.ignore_patterns(".venv*", ".git", "__pycache__", ".pytest_cache", "*.egg-info", "node_modules", ".mypy_cache")


class MutationFileError(ValueError):
    """A mutation file that does not follow the format (named entry, what is wrong, how to fix it)."""


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    source: str  # the JSON file it came from


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # "caught" | "survived" | "error"
    seconds: float
    detail: str = ""


def test_file_of(node_id: str) -> str:
    """``tests/x.py::test_a[p]`` -> ``tests/x.py``."""
    return node_id.split("::", 1)[0]


def load_mutations(path: Path, root: Path = ROOT) -> list[Mutation]:
    """Read and validate one mutation file against the repository at ``root``."""
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MutationFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise MutationFileError(f"{path}: must be a JSON list of mutation objects, got {type(entries).__name__}")
    out = []
    for n, e in enumerate(entries):
        where = f"{path.name}[{n}]" + (f" ({e.get('id')!r})" if isinstance(e, dict) else "")
        if not isinstance(e, dict):
            raise MutationFileError(f"{where}: each entry must be an object with keys {list(FIELDS)}")
        missing = [k for k in FIELDS if k not in e]
        extra = [k for k in e if k not in FIELDS]
        if missing or extra:
            raise MutationFileError(f"{where}: missing keys {missing}, unknown keys {extra}; the keys are {list(FIELDS)}")
        if not all(isinstance(e[k], str) and e[k] for k in ("id", "file", "find", "why")):
            raise MutationFileError(f"{where}: id, file, find and why must be non-empty strings")
        if not isinstance(e["replace"], str) or e["replace"] == e["find"]:
            raise MutationFileError(f"{where}: replace must be a string that differs from find")
        if not isinstance(e["tests"], list) or not e["tests"] or not all(isinstance(t, str) and t for t in e["tests"]):
            raise MutationFileError(f"{where}: tests must be a non-empty list of pytest node ids or paths")
        target = root / e["file"]
        if not target.is_file():
            raise MutationFileError(f"{where}: file {e['file']!r} does not exist (paths are relative to the repository root)")
        count = target.read_text().count(e["find"])
        if count != 1:
            raise MutationFileError(
                f"{where}: find text occurs {count} times in {e['file']}; it must occur exactly once "
                "(lengthen it with surrounding code, or update it after the source changed)"
            )
        for t in e["tests"]:
            if not (root / test_file_of(t)).exists():
                raise MutationFileError(f"{where}: test path {test_file_of(t)!r} does not exist")
        out.append(Mutation(e["id"], e["file"], e["find"], e["replace"], tuple(e["tests"]), e["why"], path.name))
    return out


def load_all(files: list[Path], root: Path = ROOT) -> list[Mutation]:
    """All mutations of the given files; ids must be unique across them."""
    muts = [m for f in files for m in load_mutations(f, root)]
    seen: dict[str, str] = {}
    for m in muts:
        if m.id in seen:
            raise MutationFileError(f"mutation id {m.id!r} appears in {seen[m.id]} and {m.source}; ids must be unique")
        seen[m.id] = m.source
    return muts


def copy_repo(dest: Path) -> Path:
    """A copy of the working tree (sources and tests, no venv / git / caches) under ``dest``."""
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORE, symlinks=True)
    return repo


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]
#: Third-party modules a forking run imports once in the parent (never this repository's own packages, which
#: every child must import from its mutated copy).
PRELOAD = ("numpy", "pandas", "scipy.stats", "torch", "einops", "jaxtyping", "safetensors.torch", "transformers",
           "transformers.models.qwen2_vl.modeling_qwen2_vl", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "transformers.models.gemma3.modeling_gemma3", "transformers.models.llava.modeling_llava",
           "transformer_lens.hook_points", "transformer_lens.ActivationCache", "pytest")
OWN_PACKAGES = ("hooked_vlm", "kernels", "analyses")


def _classify(m: Mutation, returncode: int, output: str, start: float) -> Outcome:
    tail = output.strip().splitlines()
    last = tail[-1] if tail else ""
    if returncode == 0:
        return Outcome(m, "survived", time.time() - start, last)
    if returncode == 1:  # pytest: some tests failed
        return Outcome(m, "caught", time.time() - start, last)
    # 2: interrupted (e.g. a collection error: the mutation broke an import), 4: usage error, 5: no tests
    status = "caught" if returncode == 2 and "error" in last.lower() else "error"
    return Outcome(m, status, time.time() - start, f"pytest exit {returncode}: {last}")


def _mutated_copy(m: Mutation, tmp: Path) -> Path | None:
    repo = copy_repo(tmp)
    target = repo / m.file
    text = target.read_text()
    if text.count(m.find) != 1:
        return None
    target.write_text(text.replace(m.find, m.replace))
    return repo


def run_one(m: Mutation, timeout: float) -> Outcome:
    """Apply ``m`` in a fresh copy of the repository and run its tests there, in a new interpreter."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.id}-") as tmp:
        repo = _mutated_copy(m, Path(tmp))
        if repo is None:
            return Outcome(m, "error", time.time() - start, f"find no longer occurs exactly once in {m.file}")
        env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   HOOKED_VLM_SKIP_NDIF="1")
        cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *m.tests]
        try:
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(m, "error", time.time() - start, f"timed out after {timeout:.0f} s")
        return _classify(m, proc.returncode, proc.stdout + proc.stderr, start)


def run_one_forked(m: Mutation, timeout: float) -> Outcome:
    """As :func:`run_one`, but the tests run in a child forked from this process after :data:`PRELOAD`: the
    heavy third-party imports are paid once, while the child imports this repository's packages from the
    mutated copy (the parent never imports them)."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mut-{m.id}-") as tmp:
        repo = _mutated_copy(m, Path(tmp))
        if repo is None:
            return Outcome(m, "error", time.time() - start, f"find no longer occurs exactly once in {m.file}")
        log = Path(tmp) / "pytest.log"
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 3
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(repo)
                sys.path[:0] = [str(repo)]
                os.environ.update(PYTHONDONTWRITEBYTECODE="1", HOOKED_VLM_SKIP_NDIF="1")
                sys.dont_write_bytecode = True
                import pytest

                code = int(pytest.main([*PYTEST_ARGS, *m.tests]))
            except BaseException as e:  # noqa: BLE001 -- report anything, then leave without cleanup handlers
                print(f"mutation child failed: {type(e).__name__}: {e}", flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return Outcome(m, "error", time.time() - start, f"timed out after {timeout:.0f} s")
            time.sleep(0.2)
        return _classify(m, os.waitstatus_to_exitcode(status), log.read_text(errors="replace"), start)


def preload() -> None:
    """Import the heavy third-party modules once (forking mode); refuse if this repository's packages are loaded."""
    import importlib

    os.environ["TRITON_INTERPRET"] = "1"  # as tests/conftest.py forces; before anything imports triton
    for name in PRELOAD:
        importlib.import_module(name)
    loaded = [n for n in sys.modules if n.split(".")[0] in OWN_PACKAGES]
    if loaded:
        raise RuntimeError(f"preloading imported this repository's own modules {loaded[:5]}: children would test the unmutated code")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", action="append", type=Path, help="a mutation JSON file (default: every tests/mutations/*.json)")
    p.add_argument("--only", action="append", help="run only the mutation(s) with this id")
    p.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run (default 600)")
    p.add_argument("--json", type=Path, help="also write the outcomes to this JSON file")
    p.add_argument("--no-fork", action="store_true",
                   help="one fresh interpreter per mutation instead of children forked after preloading torch / transformers")
    args = p.parse_args(argv)
    fork = hasattr(os, "fork") and not args.no_fork

    files = [f if f.is_absolute() else Path.cwd() / f for f in args.file] if args.file else sorted(MUTATION_DIR.glob("*.json"))
    muts = load_all(files)
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in muts})
        if unknown:
            print(f"unknown mutation id(s) {unknown}; known: {sorted(m.id for m in muts)}", file=sys.stderr)
            return 2
        muts = [m for m in muts if m.id in set(args.only)]
    print(f"{len(muts)} mutation(s) from {len(files)} file(s), {args.jobs} at a time", flush=True)

    outcomes: list[Outcome] = []

    if fork:
        preload()
        # control: an unmutated copy must pass, or a forked child is not a faithful test run
        control = Mutation("control", "hooked_vlm/layout.py", "def _check_frame(", "def _check_frame(",
                           ("tests/test_layout.py::test_kinds_items_frames_cells",), "no change", "-")
        c = run_one_forked(control, args.timeout)
        if c.status != "survived":
            print(f"control run (no mutation) did not pass in a forked child: {c.detail}; rerun with --no-fork", file=sys.stderr)
            return 2

    def one(m: Mutation) -> Outcome:
        o = (run_one_forked if fork else run_one)(m, args.timeout)
        print(f"  {o.status:<8} {o.seconds:6.1f}s  {m.id}", flush=True)
        return o

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(one, muts))

    width = max([len(o.mutation.id) for o in outcomes] + [2])
    print()
    print(f"{'id':<{width}}  {'status':<8}  {'time':>6}  file / detail")
    for o in outcomes:
        print(f"{o.mutation.id:<{width}}  {o.status:<8}  {o.seconds:5.1f}s  {o.mutation.file}  {o.detail if o.status != 'caught' else ''}")
    caught = sum(o.status == "caught" for o in outcomes)
    survived = [o.mutation.id for o in outcomes if o.status == "survived"]
    errors = [o.mutation.id for o in outcomes if o.status == "error"]
    rate = caught / len(outcomes) if outcomes else 1.0
    print(f"\nkill rate: {caught}/{len(outcomes)} = {100 * rate:.1f}%  (survived: {survived or 'none'}; errors: {errors or 'none'})")
    if args.json:
        args.json.write_text(json.dumps(
            [{"id": o.mutation.id, "file": o.mutation.file, "status": o.status, "seconds": round(o.seconds, 1),
              "detail": o.detail} for o in outcomes], indent=1))
    return 1 if survived or errors else 0


if __name__ == "__main__":
    sys.exit(main())
