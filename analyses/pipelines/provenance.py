"""What a run manifest records: package versions, the model fingerprint, devices and dtypes, atomic writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import torch

from hooked_vlm.atomic_files import atomic_output, atomic_write_json  # re-exported: the pipelines' file helpers

__all__ = ["atomic_output", "atomic_write_json", "model_fingerprint", "package_versions", "resolve_device", "resolve_dtype"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
PACKAGES = ("hooked-vlm", "torch", "transformers", "numpy", "pandas", "pyarrow", "tqdm", "ray")


# ------------------------------------------------------------------------------------------ files
# ------------------------------------------------------------------------------------------ devices
def resolve_device(device: str) -> str:
    """``"auto"`` -> cuda if available else cpu; any other name is checked (a clear error if unusable)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was asked for but CUDA is not available here; use --device cpu (or auto).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"Device {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s).")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (float32 / fp32, bfloat16 / bf16, float16 / fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}.")
    return DTYPES[dtype]


# ------------------------------------------------------------------------------------------ provenance
def package_versions() -> dict[str, str | None]:
    """Python, platform and the installed versions of the packages a result depends on (None = absent)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _find_module(model: Any) -> torch.nn.Module | None:
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("model", "hooked", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def _config_of(module: Any) -> Any:
    for attr in ("cfg", "config"):
        cfg = getattr(module, attr, None)
        if cfg is None:
            continue
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            return dataclasses.asdict(cfg)
        if hasattr(cfg, "to_dict"):
            return cfg.to_dict()
        return repr(cfg)
    return type(module).__name__


def model_fingerprint(model: Any) -> str:
    """SHA-256 (16 hex digits) of the model's configuration and every weight's name, dtype, shape and bytes.

    ``model`` is a ``torch.nn.Module`` or an object holding one in ``.model``; two loads of the same
    checkpoint give the same fingerprint on any device.
    """
    module = _find_module(model)
    if module is None:
        raise TypeError(f"Cannot fingerprint {type(model).__name__}: pass a torch.nn.Module or an object with a .model module.")
    h = hashlib.sha256()
    h.update(json.dumps(_config_of(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def plain(value: Any) -> Any:
    """A record value as plain Python (tensors / arrays -> lists, numpy scalars -> numbers) for Parquet."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return value
