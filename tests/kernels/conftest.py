"""Kernel tests run the Triton kernels on CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when triton's own ``@jit`` library is decorated, i.e. when triton is first
imported, so it is set here, before anything imports triton. If triton was already imported in compiled
mode by an earlier test module, the Triton cases skip (see ``triton_ok``) instead of failing.

pytest imports every ``conftest.py`` of this rootdir-less test tree under the module name ``conftest``;
test modules elsewhere do ``from conftest import ...`` and would find this file instead of
``tests/conftest.py``, so the parent's public, non-fixture names are re-exported at the end.
"""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _interpreter_ok() -> bool:
    try:
        from kernels.triton_kernels import interpreter_active
    except ImportError:
        return False
    return interpreter_active()


@pytest.fixture(scope="session")
def triton_ok() -> bool:
    return _interpreter_ok()


def _reexport_parent_conftest() -> None:
    parent = Path(__file__).resolve().parents[1] / "conftest.py"
    if not parent.exists():
        return
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", parent)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, value in vars(mod).items():
        is_fixture = type(value).__name__ == "FixtureFunctionDefinition" or hasattr(value, "_pytestfixturefunction")
        if not name.startswith("_") and not is_fixture and name not in globals():
            globals()[name] = value


_reexport_parent_conftest()
