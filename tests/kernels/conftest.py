"""Kernel tests run the Triton kernels on CPU under the Triton interpreter.

``TRITON_INTERPRET`` is read when triton's own ``@jit`` library is decorated, i.e. when triton is first
imported; ``tests/conftest.py`` forces it to 1 before any test module imports triton. ``triton_ok`` fails
(never skips) when the interpreter is not active, so a Triton case can not pass by not running.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
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
    """True; fails the test when triton is not running in interpreter mode (it was imported compiled)."""
    if not _interpreter_ok():
        pytest.fail("the Triton interpreter is not active: triton was imported before TRITON_INTERPRET=1 was set "
                    "(tests/conftest.py sets it; something imported triton earlier)")
    return True

