"""Deprecated module path: the benchmark helpers moved next to the benchmarks, to ``scripts/benchmarking.py``
(import it as ``benchmarking`` from a script in ``scripts/``). This alias loads that file from the repository
checkout for one release."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "benchmarking.py"
if not _PATH.is_file():
    raise ImportError(
        f"hooked_vlm.benchmarking moved to scripts/benchmarking.py, which is not at {_PATH}: the benchmark helpers "
        "live in the repository checkout (run the benchmarks from a clone)"
    )
warnings.warn("hooked_vlm.benchmarking is deprecated; the helpers moved to scripts/benchmarking.py "
              "(`from benchmarking import ...` in scripts/)", DeprecationWarning, stacklevel=2)
if "benchmarking" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("benchmarking", _PATH)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["benchmarking"] = _module
    _spec.loader.exec_module(_module)
globals().update({k: v for k, v in vars(sys.modules["benchmarking"]).items() if not k.startswith("__")})
