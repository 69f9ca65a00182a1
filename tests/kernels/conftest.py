"""Kernel tests run the Triton kernels on CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when triton's own ``@jit`` library is decorated, i.e. when triton is first
imported, so it is set here, before anything imports triton. If triton was already imported in compiled
mode by an earlier test module, the Triton cases skip (see ``triton_ok``) instead of failing.
"""

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

