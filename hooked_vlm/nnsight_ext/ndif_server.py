"""Server-side extension classes for running hooked_vlm models on a real NDIF 0.1.2 server, CPU only.

Importable only where the NDIF server stack is installed (``ray`` and ``ndif``; see
``scripts/ndif/install.sh``). Nothing on the client side imports this module.

NDIF exposes two extension points, both named by environment variables read when the controller
starts (``scripts/ndif/start.sh`` sets them):

``NDIF_CONTROLLER_IMPORT_PATH=hooked_vlm.nnsight_ext.ndif_server.CPUControllerActor``
    The controller. ndif 0.1.2 calls ``Remotable.describe_checkpoint(key, dtype,
    trust_remote_code=...)`` and ``Remotable.max_tp_size(key, trust_remote_code=...)``, which
    nnsight 0.8.1 does not accept, so every deploy fails. The subclass rebinds both classmethods
    to accept and drop that keyword. The rebinding happens in ``__init__``: Ray ships
    ``@ray.remote`` classes to the actor process by value, so a patch made at import time on the
    driver never runs in the actor.

``NDIF_MODEL_IMPORT_PATH=hooked_vlm.nnsight_ext.ndif_server.CPUModelActor``
    The model actor. The stock actor loads through ``HuggingFaceModel`` and calls CUDA
    unconditionally (device placement, memory fractions, ``synchronize``). This one loads any
    ``Remotable`` from its model key on the CPU (the key names its own class, so hooked_vlm's
    ``HookedVLMEnvoy`` and any other importable Remotable work), keeps the weights in the dtype
    the controller asked for (``NDIF_DEFAULT_DTYPE=float32`` for exact equality with local runs),
    never touches CUDA, and is not cacheable (there is no GPU memory to free by parking it).

Placement still needs a Ray node that advertises a ``GPU`` resource and ``cuda_memory_bytes``;
``start.sh`` declares them on the head (``ray start --num-gpus=1 --resources=...``). The declared
GPU is bookkeeping only: nothing here uses a device.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, Optional

import ray
import torch

from ndif.services.ray.deployments.controller.controller import _ControllerActor
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment

logger = logging.getLogger("ndif.hooked_vlm")


def _accept_trust_remote_code() -> None:
    """Make ``Remotable.describe_checkpoint`` / ``max_tp_size`` accept ``trust_remote_code``.

    Idempotent. hooked_vlm models never run repository code, so the flag carries no meaning for
    them; for other wrappers it is passed on only where their hook accepts it.
    """
    from nnsight.modeling.mixins.remotable import Remotable
    from nnsight.util import from_import_path

    if getattr(Remotable, "_hooked_vlm_patched", False):
        return

    def describe_checkpoint(cls, model_key: str, dtype: str, **kwargs: Any):
        import_path, suffix = model_key.split(":", 1)
        model_cls = from_import_path(import_path)
        return model_cls._remoteable_describe_checkpoint(suffix, dtype)

    def max_tp_size(cls, model_key: str, **kwargs: Any) -> Optional[int]:
        import_path, suffix = model_key.split(":", 1)
        model_cls = from_import_path(import_path)
        return model_cls._remoteable_max_tp_size(suffix)

    Remotable.describe_checkpoint = classmethod(describe_checkpoint)
    Remotable.max_tp_size = classmethod(max_tp_size)
    Remotable._hooked_vlm_patched = True


def _limit_threads() -> None:
    """One intra-op thread unless told otherwise (``HOOKED_VLM_NDIF_THREADS``).

    The CI machine has 2 cores shared by the whole stack; one thread also makes fp32 CPU results
    independent of scheduling, so remote values equal a one-thread local run bit for bit.
    """
    torch.set_num_threads(int(os.environ.get("HOOKED_VLM_NDIF_THREADS", "1")))


class _CPUController(_ControllerActor):
    """ndif's controller with the nnsight 0.8.1 keyword mismatch fixed (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _accept_trust_remote_code()
        _limit_threads()
        super().__init__(*args, **kwargs)


# Same options as ndif's own ControllerActor: pinned to the head node, restarted forever.
CPUControllerActor = ray.remote(num_cpus=1, num_gpus=0, max_restarts=-1, resources={"head": 1})(
    _CPUController
)


class _CPUModelDeployment(BaseModelDeployment):
    """A model replica on the CPU: loads any Remotable from its key; no CUDA anywhere."""

    #: Parking HOT->WARM moves weights GPU->CPU; on a CPU replica there is nothing to move, so the
    #: controller evicts it outright instead.
    CACHEABLE: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _accept_trust_remote_code()
        _limit_threads()
        super().__init__(*args, **kwargs)

    def load_from_disk(self):  # noqa: D401 - overrides the stock GPU loader
        """Build the model from its key on the CPU in the requested dtype.

        The key's import path picks the wrapper class; for hooked_vlm that rebuilds the model from
        its family, config and seed (or a local checkpoint), never from a hub. Parameters keep
        ``requires_grad`` as built, so gradient experiments behave exactly as in a local trace.
        """
        from nnsight.modeling.mixins.remotable import Remotable

        kwargs = {k: v for k, v in self.kwargs.items() if k != "trust_remote_code"}
        model = Remotable.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu", **kwargs
        )
        for name, tensor in list(model._module.named_parameters()) + list(
            model._module.named_buffers()
        ):
            if tensor.device.type != "cpu":
                raise RuntimeError(f"{name!r} is on {tensor.device}, expected the CPU")
        logger.info(f"Loaded {self.model_key} on the CPU ({self.dtype_name})")
        return model

    async def to_cache(self) -> None:
        raise RuntimeError("CPU replicas are not cacheable (CACHEABLE=False)")

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        raise RuntimeError("CPU replicas are not cacheable (CACHEABLE=False)")

    def format_error(self, exception: BaseException) -> "tuple[str, bool]":
        """The client's error line first, then only its own trace frames (server frames counted, not shown).

        Upstream sends the whole formatted traceback (1-3 KB starting with server-internal frames).
        A CPU replica has no unrecoverable device errors, so nothing here is fatal.
        """
        from hooked_vlm.nnsight_ext.ndif_guard import client_error_message

        message, _ = super().format_error(exception)
        if message == str(exception):  # upstream's RequestError: already one sentence
            return message, False
        return client_error_message(exception), False

    def cleanup(self) -> None:
        """Per-request reset, as the stock actor does, minus the CUDA calls."""
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


CPUModelActor = ray.remote(num_cpus=1, max_restarts=-1)(_CPUModelDeployment)
