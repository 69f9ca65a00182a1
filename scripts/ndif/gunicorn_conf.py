"""Gunicorn config for hooked_vlm's NDIF API (``gunicorn -c scripts/ndif/gunicorn_conf.py hooked_vlm.nnsight_ext.ndif_api:app``).

ndif's own config, with three changes:

* anyio's asyncio backend is imported HERE, in the master, before anything imports nnsight. nnsight's
  PYMOUNT (on by default) mounts ``save`` on ``object``; anyio 4.16 imports its asyncio backend lazily,
  and importing it after that fails (``TypeError: Attribute 'save' is missing its type annotation``), so
  Starlette could not spool any multipart body over 1 MiB: every such request got HTTP 400 "There was an
  error parsing the body". Reproduce in the server venv:
  ``python -c "import nnsight, anyio, asyncio; asyncio.run(anyio.to_thread.run_sync(lambda: 1))"``.
  Forked workers inherit the already imported backend.
* the bind address comes from ``NDIF_API_HOST`` (default 127.0.0.1) and is refused beyond loopback
  unless ``HOOKED_VLM_NDIF_API_KEY`` is set (upstream binds 0.0.0.0);
* the dispatcher is hooked_vlm's resilient subclass (``ndif_api.run_dispatcher``).
"""

import anyio._backends._asyncio  # noqa: F401  (must precede nnsight; see the docstring)

import os
import runpy
from multiprocessing import get_context

from ndif.services.api.gunicorn_conf import post_fork, timeout, worker_class, workers  # noqa: F401

from hooked_vlm.nnsight_ext.ndif_guard import API_KEY_ENV, check_bind

_host = os.environ.get("NDIF_API_HOST", "127.0.0.1")
check_bind(_host, os.environ.get(API_KEY_ENV))
bind = f"{_host}:{os.environ.get('NDIF_API_PORT', '8001')}"


def on_starting(server):
    """Start the single queue dispatcher as a spawned process, as upstream does, with our subclass.

    The target is ``runpy.run_module`` (picklable by reference) so the master imports neither the
    dispatcher nor its telemetry providers before it forks the workers.
    """
    get_context("spawn").Process(
        target=runpy.run_module,
        args=("hooked_vlm.nnsight_ext.ndif_api",),
        kwargs={"run_name": "__main__"},
        daemon=False,
        name="DispatcherProcess",
    ).start()
