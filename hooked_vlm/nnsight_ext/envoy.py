"""``HookedVLMEnvoy``: nnsight over hooked_vlm models, locally and on an NDIF server.

The envoy tree mirrors the model's own module tree, so every TransformerLens hook point is an
attribute path: ``nn_model.blocks[3].hook_resid_post.output``, ``nn_model.vision.blocks[0].attn
.hook_pattern.output``. What this class adds to plain ``nnsight.NNsight``:

* **several invokes in one trace** (``_batch_size`` / ``_batch``): invokes' Hugging Face keyword
  inputs are merged into one batch: sequence tensors (``input_ids``, ``attention_mask``, token type
  ids) are padded to the longest invoke (left padding by default, so positions counted from the
  right name the same token in every invoke), and visual inputs (``pixel_values``,
  ``image_grid_thw``, their video twins, ...) are concatenated in invoke order, which is the order
  the model consumes them. Hook activations are batch-first, so nnsight hands each invoke its rows.
* **a remote identity without a hub** (``Remotable``): the model key is
  ``hooked_vlm.nnsight_ext.envoy.HookedVLMEnvoy:<canonical JSON spec>`` where the spec names the
  family, its config and either a seed (random weights, rebuilt bit-identically from torch's RNG)
  or a local safetensors checkpoint (path + sha256). The server rebuilds the model from the key.
* ``scan`` (shapes on the meta device), ``remote=True`` / ``remote="local"``, sessions, gradients
  and everything else nnsight's ``Remotable`` provides.

A spec is a plain JSON-able dict::

    {"family": "toy", "config": {...}, "seed": 0}
    {"family": "qwen2_vl", "config": {...}, "checkpoint": "/abs/model.safetensors", "sha256": "..."}

Families are builders registered with :func:`register_family`: ``build(config, seed) -> nn.Module``
constructs the architecture (parameters initialised from torch's global RNG, which the envoy seeds
inside a forked RNG state, so building never disturbs the caller's RNG). ``families.py`` registers
``"tiny"`` (hooked_vlm's tiny models) and ``"hf"`` (any supported transformers architecture from its
config dict); ``"toy"`` is a minimal hooked transformer for fast tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from nnsight.intervention.envoy import Envoy
from nnsight.intervention.tracer import InterleavingTracer
from nnsight.modeling.mixins.remotable import CheckpointInfo, Remotable, bytes_per_element
from torch import Tensor, nn

#: family name -> builder(config dict, seed or None) -> nn.Module.
_FAMILIES: dict[str, Callable[[dict[str, Any], int | None], nn.Module]] = {}

#: Load keywords an NDIF server passes that mean nothing to a CPU-built hooked model.
_IGNORED_LOAD_KWARGS = ("device_map", "max_memory", "trust_remote_code", "revision", "low_cpu_mem_usage")

#: Generic per-position inputs and their padding (None: the pad token id); a family's own ``[batch, seq]``
#: inputs come from its input schema (``hooked_vlm.families.<family>.FAMILY.input_schema``).
_GENERIC_SEQUENCE_INPUTS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "labels": -100}


def _sequence_inputs(schema: Any) -> dict[str, int | None]:
    """``[batch, seq]`` inputs -> padding value: the schema's (every registered family's when None)."""
    from hooked_vlm.families.registry import families

    schemas = [schema] if schema is not None else [fam.input_schema for fam in families()]
    out = dict(_GENERIC_SEQUENCE_INPUTS)
    for sch in schemas:
        for name in sch.per_sequence:
            out.setdefault(name, sch.pad_value(name))
    return out


def _padded_pixels(schema: Any) -> tuple[str, ...]:
    from hooked_vlm.families.registry import families

    schemas = [schema] if schema is not None else [fam.input_schema for fam in families()]
    return tuple(name for sch in schemas for name in sch.padded_pixels)


def register_family(name: str, build: Callable[[dict[str, Any], int | None], nn.Module]) -> None:
    """Make ``{"family": name, ...}`` specs buildable (on the client and on the server alike).

    ``build(config, seed)`` returns the module; it runs with torch's global RNG already seeded
    with ``seed`` (inside a forked RNG state) and may seed further itself. ``seed=None`` asks for
    the architecture only (weights are then either meta tensors or overwritten by a checkpoint).
    The server imports this module to rebuild a model, so a family must be registered when
    ``hooked_vlm.nnsight_ext`` is imported (or by a module that it imports).
    """
    _FAMILIES[name] = build


def registered_families() -> list[str]:
    _ensure_builtin_families()
    return sorted(_FAMILIES)


def _ensure_builtin_families() -> None:
    if "toy" not in _FAMILIES:
        from hooked_vlm.nnsight_ext.toy import build_toy

        register_family("toy", lambda config, seed: build_toy(config))
    if "tiny" not in _FAMILIES:
        import importlib

        importlib.import_module("hooked_vlm.nnsight_ext.families")  # registers "tiny" and "hf"


def canonical_spec(spec: dict[str, Any]) -> str:
    """The spec as canonical JSON (sorted keys, no spaces): equal specs give equal keys."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"model spec values must be JSON-serialisable, got {type(value).__name__}: {value!r}")


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_from_spec(spec: dict[str, Any], *, weights: bool = True, dtype: Any = None) -> nn.Module:
    """Build the module a spec describes.

    ``weights=False`` builds the architecture only (what ``_load_meta`` wants, under nnsight's meta
    device). With weights, a ``seed`` spec initialises from ``torch.manual_seed(seed)`` in a forked
    RNG state; a ``checkpoint`` spec loads the safetensors file after checking its sha256.
    """
    _ensure_builtin_families()
    family = spec.get("family")
    if family not in _FAMILIES:
        raise KeyError(f"unknown hooked_vlm family {family!r}; registered: {sorted(_FAMILIES)}")
    build = _FAMILIES[family]
    config = spec.get("config") or {}
    if not weights:
        module = build(config, None)
    elif "checkpoint" in spec:
        path = spec["checkpoint"]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} named by the model key does not exist on this machine; a "
                "checkpoint key works only where the server can read the same file"
            )
        if spec.get("sha256") and file_sha256(path) != spec["sha256"]:
            raise ValueError(f"checkpoint {path!r} does not match the sha256 in the model key")
        from safetensors.torch import load_file

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = build(config, None)
        module.load_state_dict(load_file(path), strict=True)
    elif "seed" in spec:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec["seed"]))
            module = build(config, int(spec["seed"]))
    else:
        raise ValueError("a model spec needs either a 'seed' or a 'checkpoint' to build weights")
    resolved = _resolve_dtype(dtype)
    if resolved is not None and weights:
        module = module.to(resolved)
    return module.eval()


#: Attention modules whose ``force_pattern`` this process switched on for the running trace.
_FORCED_PATTERNS: list[nn.Module] = []


class PatternHookEnvoy(Envoy):
    """Envoy of an attention's ``hook_pattern`` / ``hook_attn_scores``.

    hooked_vlm's attention materialises the ``[B, H, L, L]`` scores and pattern only when something
    listens to them (a torch hook, the cache, or ``attn.force_pattern``); otherwise it takes the
    fused fast path and these hook points never fire. nnsight registers no torch hooks, so reading,
    writing or skipping one of these hook points in a trace switches ``force_pattern`` on for that
    attention module, for that trace only (``HookedVLMEnvoy.interleave`` switches it back off).
    The request is made when the intervention asks for the value, which is always before the
    forward reaches the attention's pattern-or-fast-path decision (after its projections).
    """

    _PATTERN_ACCESS = frozenset(("output", "input", "inputs", "skip"))

    def __getattribute__(self, name: str) -> Any:
        if name in PatternHookEnvoy._PATTERN_ACCESS:
            object.__getattribute__(self, "_hvlm_want_pattern")()
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PatternHookEnvoy._PATTERN_ACCESS:
            self._hvlm_want_pattern()
        super().__setattr__(name, value)

    def _hvlm_want_pattern(self) -> None:
        if not getattr(self.interleaver, "interleaving", False):
            return  # not inside a running trace: nothing to switch on (and nothing would switch it off)
        parent = self.parent
        attention = getattr(parent, "_module", None) if parent is not None else None
        if attention is not None and getattr(attention, "force_pattern", None) is False:
            attention.force_pattern = True
            _FORCED_PATTERNS.append(attention)


class HookedScanTracer(InterleavingTracer):
    """``scan`` for hooked VLMs: shapes of every activation without loading the weights.

    Where it differs from nnsight's fake-tensor contract, and why:

    * nnsight's ``scan`` runs the forward under ``FakeTensorMode``: every ``.output`` / ``.input`` is a
      ``FakeTensor`` (shape, dtype and device, no data), and code that needs a value fails. A VLM's
      forward reads input *values* before its first layer (which positions hold image tokens, M-RoPE
      positions, patch grids, padding, crop counts), so under fake tensors it cannot run at all.
    * Here the real forward runs on the real inputs, under ``torch.no_grad``, with the parameters of an
      undispatched model materialised as *uninitialised* CPU memory for the duration (and put back on
      the meta device afterwards). So ``.output`` is a real ``torch.Tensor`` whose shape, dtype and
      (CPU) device are exact and whose *values are meaningless*; no weights are loaded or downloaded.
    * The cost is one CPU forward at the given input size (nnsight's costs no arithmetic); on an
      already dispatched model it is a plain no-grad forward (values then real).
    * Attention patterns read in a scan are materialised like in a trace; gradients are unavailable.

    Read only ``.shape`` / ``.dtype`` inside a scan, as with nnsight.
    """

    def execute(self, code: Any) -> None:
        envoy = self.envoy
        with envoy._hvlm_scan_weights(), torch.no_grad():
            super().execute(code)


def _release_forced_patterns() -> None:
    while _FORCED_PATTERNS:
        _FORCED_PATTERNS.pop().force_pattern = False


class HookedVLMEnvoy(Remotable):
    """An nnsight model over a hooked_vlm model (or any TransformerLens-style hooked module).

    Construct it from a spec (meta build; real weights load on first trace, or pass
    ``dispatch=True``), or around a ready module with :func:`hooked_vlm.nnsight_ext.to_nnsight`.
    """

    #: Padding side when invokes differ in length ("left" keeps the last token aligned).
    padding_side: str = "left"

    def __init__(self, *args: Any, spec: dict[str, Any] | None = None, pad_token_id: int | None = None, **kwargs: Any):
        for name in _IGNORED_LOAD_KWARGS:
            kwargs.pop(name, None)
        device = kwargs.pop("device", None)
        if device is not None and torch.device(device).type != "cpu":
            kwargs["device"] = device
        if args and isinstance(args[0], dict):
            spec = args[0]
        self._hvlm_spec = dict(spec) if spec is not None else None
        self._hvlm_pad_token_id = pad_token_id
        envoys = {"hook_pattern": PatternHookEnvoy, "hook_attn_scores": PatternHookEnvoy}
        if isinstance(kwargs.get("envoys"), dict):
            envoys.update(kwargs["envoys"])
        if kwargs.get("envoys") is None or isinstance(kwargs.get("envoys"), dict):
            kwargs["envoys"] = envoys
        super().__init__(*args, **kwargs)
        if self._hvlm_pad_token_id is None:
            self._hvlm_pad_token_id = _pad_token_id_of(self._module)

    # ----- building ---------------------------------------------------------------------------
    def _load_meta(self, spec: dict[str, Any], **kwargs: Any) -> nn.Module:
        return build_from_spec(spec, weights=False)

    def _load(self, spec: dict[str, Any], dtype: Any = None, device: Any = None, **kwargs: Any) -> nn.Module:
        module = build_from_spec(spec, weights=True, dtype=dtype)
        return module.to(device) if device is not None else module

    def scan(self, *args: Any, fn: Any = None, backend: Any = None, **kwargs: Any) -> HookedScanTracer:
        """Activation shapes without weights (see :class:`HookedScanTracer`); read ``.shape`` inside."""
        return HookedScanTracer(self, fn if fn is not None else "__call__", *args, backend=backend, **kwargs)

    @contextlib.contextmanager
    def _hvlm_scan_weights(self) -> Iterator[None]:
        if self.dispatched:
            yield
            return
        module = self._module
        module.to_empty(device="cpu")
        self.dispatched = True  # keep Meta.interleave from loading the real weights
        try:
            yield
        finally:
            self.dispatched = False
            module.to_empty(device="meta")

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().interleave(fn, *args, **kwargs)
        finally:
            _release_forced_patterns()

    # ----- remote identity --------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any] | None:
        """The spec this model is rebuilt from on a server (None: local use only)."""
        return self._hvlm_spec

    def _remoteable_model_key(self) -> str:
        if self._hvlm_spec is None:
            raise ValueError(
                "this nnsight model has no remote identity: build it with "
                "to_nnsight(model, seed=...) for a model made from a seeded family factory, or "
                "to_nnsight(model, checkpoint='path/to/file.safetensors') to save its weights where the "
                "server can load them"
            )
        return canonical_spec(self._hvlm_spec)

    @classmethod
    def _remoteable_from_model_key(cls, model_key: str, **kwargs: Any) -> "HookedVLMEnvoy":
        return cls(json.loads(model_key), **kwargs)

    @classmethod
    def _remoteable_describe_checkpoint(cls, model_key: str, dtype: str, **kwargs: Any) -> CheckpointInfo:
        from nnsight.modeling.mixins.meta import MetaDevice

        with MetaDevice():
            module = build_from_spec(json.loads(model_key), weights=False)
        n_params = sum(p.nelement() for p in module.parameters())
        elements = n_params + sum(b.nelement() for b in module.buffers())
        return CheckpointInfo(size_bytes=math.ceil(elements * bytes_per_element(dtype)), n_params=n_params)

    @classmethod
    def _remoteable_estimate_bytes(cls, model_key: str, dtype: str) -> int:
        return cls._remoteable_describe_checkpoint(model_key, dtype).size_bytes

    # ----- batching several invokes -------------------------------------------------------------
    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        first = inputs[0] if inputs else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if first is None:
            return 0
        if isinstance(first, Tensor):
            return int(first.shape[0]) if first.dim() > 1 else 1
        if isinstance(first, (list, tuple)):
            return len(first)
        raise TypeError(
            f"{type(self).__name__} takes the Hugging Face keyword tensors (input_ids=[batch, seq], ...), "
            f"got {type(first).__name__}"
        )

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        if not invokes:
            return tuple(), {}
        if len(invokes) == 1:
            return invokes[0]
        schema = getattr(self._module, "input_schema", None)
        return (), batch_inputs(
            [_as_kwargs(args, kwargs) for args, kwargs in invokes],
            pad_token_id=self._hvlm_pad_token_id or 0,
            padding_side=self.padding_side,
            schema=schema() if callable(schema) else None,
        )


def _as_kwargs(args: tuple, kwargs: dict) -> dict[str, Any]:
    if len(args) > 1:
        raise TypeError("pass inputs as keywords (input_ids=..., pixel_values=...) when batching invokes")
    merged = dict(kwargs)
    if args:
        if "input_ids" in merged:
            raise TypeError("input_ids given both positionally and as a keyword")
        merged["input_ids"] = args[0]
    return merged


def _rows(inputs: dict[str, Any]) -> int:
    first = inputs.get("input_ids", inputs.get("inputs_embeds"))
    return int(first.shape[0])


def batch_inputs(
    invokes: list[dict[str, Any]], *, pad_token_id: int = 0, padding_side: str = "left", schema: Any = None
) -> dict[str, Any]:
    """Merge several invokes' Hugging Face keyword inputs into one batch.

    ``schema``: the model's :class:`~hooked_vlm.families.registry.InputSchema` (``model.input_schema()``);
    None = the union of every registered family's schema.

    * ``[batch, seq]`` inputs (``input_ids``, ``attention_mask``, ``labels`` and the schema's
      ``per_sequence`` inputs) are padded to the longest sequence on ``padding_side``
      (an ``attention_mask`` of ones is made for invokes without one when padding is needed) and
      concatenated on the batch dimension;
    * ``position_ids`` (``[batch, seq]`` or M-RoPE's ``[3, batch, seq]``) are concatenated on their
      batch dimension and must not need padding;
    * every other tensor (the schema's pixels, structure and per-prompt inputs) is concatenated on dim 0 in
      invoke order; invokes without it contribute nothing (text-only rows next to image rows); pixel inputs
      the schema lists as ``padded_pixels`` (crops per image) are zero-padded on dim 1 first;
    * lists are concatenated; any other value must be equal across the invokes that give it.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [int(inv.get("input_ids", inv.get("inputs_embeds")).shape[1]) for inv in invokes]
    longest = max(lengths)
    needs_padding = any(length != longest for length in lengths)
    keys: list[str] = []
    for inv in invokes:
        keys.extend(k for k in inv if k not in keys)
    if needs_padding and "attention_mask" not in keys:
        keys.append("attention_mask")

    sequence_inputs = _sequence_inputs(schema)
    padded_pixels = _padded_pixels(schema)
    merged: dict[str, Any] = {}
    for key in keys:
        values = [inv.get(key) for inv in invokes]
        present = [v for v in values if v is not None]
        if not present and key != "attention_mask":
            merged[key] = None
            continue
        if key in sequence_inputs or key == "inputs_embeds":
            parts = []
            for inv, value, length in zip(invokes, values, lengths):
                if value is None:
                    if key != "attention_mask":
                        raise ValueError(f"{key!r} is given for some invokes but not for others")
                    device = inv.get("input_ids", inv.get("inputs_embeds")).device
                    value = torch.ones(_rows(inv), length, dtype=torch.long, device=device)
                fill = sequence_inputs.get(key, 0)
                parts.append(_pad_seq(value, longest, pad_token_id if fill is None else fill, padding_side))
            merged[key] = torch.cat(parts, dim=0)
        elif key == "position_ids":
            if len(present) != len(values):
                raise ValueError("'position_ids' is given for some invokes but not for others")
            if needs_padding:
                raise ValueError("explicit position_ids cannot be padded: give invokes of equal length")
            merged[key] = torch.cat(values, dim=1 if values[0].dim() == 3 else 0)
        elif isinstance(present[0], Tensor):
            merged[key] = _cat_rows(key, present, crops_padded=key in padded_pixels)
        elif isinstance(present[0], (list, tuple)):
            merged[key] = [item for value in present for item in value]
        else:
            if any(v != present[0] for v in present[1:]):
                raise ValueError(f"invokes disagree on the non-tensor input {key!r}: {present}")
            merged[key] = present[0]
    return merged


def _cat_rows(key: str, values: list[Tensor], crops_padded: bool) -> Tensor:
    """Concatenate on dim 0; crop-padded pixel inputs (any-resolution ``[n, crops, C, H, W]``, whose true crop
    count the model reads from the image sizes) are zero-padded to the larger crop count first, as the
    processor does for one batch."""
    trailing = {tuple(v.shape[1:]) for v in values}
    if len(trailing) > 1:
        if crops_padded and len({(v.dim(), *v.shape[2:]) for v in values}) == 1:
            crops = max(v.shape[1] for v in values)
            values = [torch.cat([v, v.new_zeros(v.shape[0], crops - v.shape[1], *v.shape[2:])], dim=1) for v in values]
        else:
            raise ValueError(
                f"cannot batch {key!r} across invokes: per-row shapes {sorted(trailing)} differ; give invokes "
                "inputs made by the same processor settings (same image size / frame count)"
            )
    return torch.cat(values, dim=0)


def _pad_seq(value: Tensor, length: int, fill: int | float, side: str) -> Tensor:
    missing = length - value.shape[1]
    if missing == 0:
        return value
    pad = torch.full((value.shape[0], missing, *value.shape[2:]), fill, dtype=value.dtype, device=value.device)
    return torch.cat([pad, value] if side == "left" else [value, pad], dim=1)


def _pad_token_id_of(module: nn.Module) -> int | None:
    cfg = getattr(module, "cfg", None)
    hf_config = getattr(cfg, "hf_config", None) or {}
    for source in (hf_config, hf_config.get("text_config") or {} if isinstance(hf_config, dict) else {}):
        if isinstance(source, dict) and source.get("pad_token_id") is not None:
            return int(source["pad_token_id"])
    return None


def to_nnsight(
    model: nn.Module,
    *,
    spec: dict[str, Any] | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    verify: bool = True,
    **kwargs: Any,
) -> HookedVLMEnvoy:
    """Wrap a ready hooked model for nnsight (``HookedVLM.to_nnsight`` binds to this).

    The remote identity (what ``remote=True`` sends) comes from, in order:

    * ``spec``: an explicit spec (see the module docstring);
    * ``checkpoint``: the weights are saved there as safetensors and the key names the file and its
      sha256 (the server must be able to read the path: same machine or shared disk);
    * ``seed``: the model is its family's default initialisation under ``torch.manual_seed(seed)``
      (family and config read from the model); with ``verify`` (default) the model is rebuilt once
      and compared, so a wrong seed fails here rather than giving different numbers remotely;
    * a spec the model carries (``model._hooked_vlm_spec``).

    Without any, the model works locally and ``remote=True`` raises an error saying how to give it
    an identity. Other keywords go to :class:`HookedVLMEnvoy` (e.g. ``pad_token_id``).
    """
    if spec is None and checkpoint is not None:
        family, config = family_and_config(model)
        from safetensors.torch import save_file

        path = os.path.abspath(os.fspath(checkpoint))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        # Every entry saved as its own contiguous copy: hooked weights may be views into a fused
        # projection, and tied weights load back into both names.
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
        spec = {"family": family, "config": config, "checkpoint": path, "sha256": file_sha256(path)}
    elif spec is None and seed is not None:
        family, config = family_and_config(model)
        spec = {"family": family, "config": config, "seed": int(seed)}
        if verify:
            _verify_spec(model, spec)
    elif spec is None:
        spec = getattr(model, "_hooked_vlm_spec", None)
    return HookedVLMEnvoy(model, spec=spec, **kwargs)


def _verify_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    rebuilt = build_from_spec(spec, weights=True).state_dict()
    ours = model.state_dict()
    differ = [k for k in ours if k not in rebuilt or not torch.equal(ours[k].detach().cpu(), rebuilt[k].to(ours[k].dtype))]
    if differ or set(rebuilt) - set(ours):
        raise ValueError(
            f"the model's weights are not the {spec['family']!r} family's seed-{spec['seed']} initialisation "
            f"(first differing tensors: {differ[:4]}); use to_nnsight(model, checkpoint='file.safetensors') "
            "to give it a remote identity from its actual weights"
        )


def family_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The registered family and config dict a model is rebuilt from."""
    from hooked_vlm.nnsight_ext.toy import ToyHookedModel

    if isinstance(model, ToyHookedModel):
        return "toy", dict(model.config)
    import importlib

    return importlib.import_module("hooked_vlm.nnsight_ext.families").family_and_config(model)
