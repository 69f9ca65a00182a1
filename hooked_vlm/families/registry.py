"""The family contract: one :class:`Family` registration per folder ``hooked_vlm/families/<family>/``.

A family package's ``__init__.py`` defines ``FAMILY = Family(...)``: its architectures, model class, input
builder, input schema, tiny models and declared hooks. Loading, the CLI, nnsight, the tiny models and the
analyses all read these objects (:func:`families`, :func:`family_for_architecture`, :func:`family_of`);
nothing outside a family's folder names its classes or its input keys. This module imports no torch (listing
architectures and built-in models stays instant); classes and builders are ``"module:attribute"`` strings
imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from hooked_vlm.errors import UnsupportedModelError

#: Keyword inputs every HookedVLM forward takes besides its family's (see ``HookedVLM.forward``).
GENERIC_INPUTS = ("position_ids", "vision_features", "return_type", "stop_at_layer", "final_positions", "start_at_layer",
                  "resid")


@dataclass(frozen=True)
class InputSchema:
    """Which keyword inputs a family takes and how each one is laid out.

    * ``per_sequence``: ``[batch, seq]`` tensors aligned with ``input_ids`` (padded, sliced and concatenated
      along positions); ``pad_values`` gives each one's padding value (default 0).
    * ``pixels``: pixel tensors (one block of rows per image / video, concatenated over the batch in prompt
      order); the inputs a pixel-space corruption edits.
    * ``structure``: per-item tensors that describe geometry, not content (grids, image sizes, seconds per
      slice); a clean and a corrupted run must share them exactly.
    * ``per_prompt``: tensors with one entry per prompt (concatenated on dim 0 when prompts are batched).
    * ``options``: non-tensor per-call settings (never batched; equal across the runs of one analysis).
    * ``padded_pixels``: pixel inputs ``[items, crops, ...]`` whose crop axis may be zero-padded when items of
      different crop counts are batched (the model reads the true count from ``structure``).
    * ``pixel_kinds``: ``(item kind, pixel input)`` pairs: which pixel input holds the pixels of a layout item
      of each kind (``"image"`` / ``"video"``).
    """

    per_sequence: tuple[str, ...] = ("input_ids", "attention_mask")
    pixels: tuple[str, ...] = ()
    structure: tuple[str, ...] = ()
    per_prompt: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    pad_values: tuple[tuple[str, int], ...] = (("attention_mask", 0),)
    padded_pixels: tuple[str, ...] = ()
    pixel_kinds: tuple[tuple[str, str], ...] = ()

    @property
    def per_item(self) -> tuple[str, ...]:
        """Inputs with rows per image / video (pixels and their structure)."""
        return self.pixels + self.structure

    @property
    def names(self) -> tuple[str, ...]:
        """Every keyword input of the family (the HF keyword tensors and options)."""
        return self.per_sequence + self.pixels + self.structure + self.per_prompt + self.options

    @property
    def must_match(self) -> tuple[str, ...]:
        """Inputs two runs compared position by position must share exactly (besides token / pixel values)."""
        return tuple(n for n in self.per_sequence if n != "input_ids") + self.structure + self.per_prompt

    def pad_value(self, name: str) -> int:
        return dict(self.pad_values).get(name, 0)

    def pixel_input(self, kind: str) -> str:
        """The pixel input that holds the pixels of layout items of ``kind`` (``"image"`` / ``"video"``)."""
        for k, name in self.pixel_kinds:
            if k == kind:
                return name
        raise ValueError(f"this family takes no {kind} pixels; its pixel inputs are {dict(self.pixel_kinds)}")

    def pixel_kind(self, name: str) -> str:
        """The layout item kind (``"image"`` / ``"video"``) whose pixels the input ``name`` holds."""
        for k, n in self.pixel_kinds:
            if n == name:
                return k
        raise ValueError(f"{name!r} is not a pixel input of this family; its pixel inputs are {dict(self.pixel_kinds)}")


@dataclass(frozen=True)
class TinyModel:
    """A random-weight tiny model of the family: ``config`` (``"module:function"`` returning a transformers
    config; keyword overrides allowed) and the transformers class ``hf_class`` it instantiates."""

    name: str
    config: str
    hf_class: str


@dataclass(frozen=True)
class Family:
    """Everything the library knows about one model family, in one object (see ``docs/developer_api.md``)."""

    name: str  # the folder: hooked_vlm/families/<name>/
    summary: str
    architectures: tuple[str, ...]  # Hugging Face ``architectures`` names this family reimplements
    model_class: str  # "module:Class" of the HookedVLM (or two-tower) subclass
    config_families: tuple[str, ...]  # the ``cfg.family`` values its models carry
    input_schema: InputSchema
    input_builder: str | None = None  # "module:function": CLI InputRequest -> keyword tensors
    model_types: tuple[tuple[str, str], ...] = ()  # config.json model_type -> architecture (no ``architectures``)
    tiny_models: tuple[TinyModel, ...] = ()
    #: hook names every model of the family must have; ``{i}`` = each LM block, ``{j}`` = each vision block
    hooks: tuple[str, ...] = ()
    #: True: ``forward`` takes pixels and token ids (a HookedVLM); False: a two-tower model (CLIP / SigLIP)
    generative: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def load_class(self) -> type:
        """The model class (imports the family's model module, and torch)."""
        return _resolve(self.model_class)

    def load_input_builder(self) -> Any:
        return None if self.input_builder is None else _resolve(self.input_builder)

    @property
    def module(self) -> str:
        """The module that defines the model class."""
        return self.model_class.split(":")[0]


#: Hooks every generative family has (language-model side); families add their vision hooks.
LM_HOOKS: tuple[str, ...] = (
    "hook_embed",
    "blocks.{i}.hook_resid_pre",
    "blocks.{i}.hook_resid_mid",
    "blocks.{i}.hook_resid_post",
    "blocks.{i}.ln1.hook_scale",
    "blocks.{i}.ln1.hook_normalized",
    "blocks.{i}.ln2.hook_scale",
    "blocks.{i}.ln2.hook_normalized",
    "blocks.{i}.attn.hook_q",
    "blocks.{i}.attn.hook_k",
    "blocks.{i}.attn.hook_v",
    "blocks.{i}.attn.hook_rot_q",
    "blocks.{i}.attn.hook_rot_k",
    "blocks.{i}.attn.hook_attn_scores",
    "blocks.{i}.attn.hook_pattern",
    "blocks.{i}.attn.hook_z",
    "blocks.{i}.attn.hook_result",
    "blocks.{i}.hook_attn_out",
    "blocks.{i}.hook_mlp_out",
    "blocks.{i}.mlp.hook_pre",
    "blocks.{i}.mlp.hook_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
    "unembed.hook_in",
    "unembed.hook_out",
    "vision.hook_out",
)

#: Hooks of every vision transformer block (``{j}``).
VISION_BLOCK_HOOKS: tuple[str, ...] = (
    "vision.blocks.{j}.hook_resid_pre",
    "vision.blocks.{j}.hook_resid_post",
    "vision.blocks.{j}.attn.hook_q",
    "vision.blocks.{j}.attn.hook_pattern",
    "vision.blocks.{j}.attn.hook_z",
    "vision.blocks.{j}.hook_attn_out",
    "vision.blocks.{j}.hook_mlp_out",
)


def lazy_attributes(package: str, modules: tuple[str, ...]) -> Any:
    """A module ``__getattr__`` for a family package: a name of one of its ``modules`` (``"model"``, ...) resolves
    on first use, so importing the package (its ``FAMILY``) imports no torch."""

    def __getattr__(name: str) -> Any:
        for sub in modules:
            module = importlib.import_module(f"{package}.{sub}")
            if name in vars(module):
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@lru_cache(maxsize=1)
def _discovered() -> tuple[Family, ...]:
    import hooked_vlm.families as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg:
            fam = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "FAMILY", None)
            if isinstance(fam, Family):
                found.append(fam)
    return tuple(found)


def families() -> tuple[Family, ...]:
    """Every registered family: each sub-package of ``hooked_vlm.families`` that defines ``FAMILY`` (sorted by name)."""
    return _discovered()


def family(name: str) -> Family:
    """The family registered under folder name ``name`` (``"qwen_vl"``, ``"llava"``, ...)."""
    for fam in families():
        if fam.name == name:
            return fam
    raise KeyError(f"no family {name!r}; registered: {[f.name for f in families()]}")


def family_for_architecture(architecture: str) -> Family:
    """The family that reimplements a Hugging Face architecture name."""
    for fam in families():
        if architecture in fam.architectures:
            return fam
    raise UnsupportedModelError(
        f"architecture {architecture!r} is not supported by hooked_vlm; supported: {supported_architectures()}"
    )


def family_of(config_family: str) -> Family | None:
    """The family whose models carry ``cfg.family == config_family`` (None when no family claims it)."""
    for fam in families():
        if config_family in fam.config_families:
            return fam
    return None


def all_pixel_inputs() -> tuple[str, ...]:
    """Every pixel input name of every registered family (for code that has inputs but no model)."""
    return tuple(dict.fromkeys(n for fam in families() for n in fam.input_schema.pixels))


def supported_architectures() -> list[str]:
    return sorted(a for fam in families() for a in fam.architectures)


def architecture_for_model_type(model_type: str | None) -> str | None:
    for fam in families():
        for mt, arch in fam.model_types:
            if mt == model_type:
                return arch
    return None


def expand_hooks(patterns: tuple[str, ...], n_layers: int, n_vision_layers: int) -> list[str]:
    """Declared hook patterns with ``{i}`` / ``{j}`` replaced by every block index."""
    out: list[str] = []
    for p in patterns:
        if "{i}" in p:
            out += [p.format(i=i) for i in range(n_layers)]
        elif "{j}" in p:
            out += [p.format(j=j) for j in range(n_vision_layers)]
        else:
            out.append(p)
    return out


__all__ = [
    "Family",
    "InputSchema",
    "TinyModel",
    "GENERIC_INPUTS",
    "LM_HOOKS",
    "VISION_BLOCK_HOOKS",
    "families",
    "family",
    "family_for_architecture",
    "family_of",
    "supported_architectures",
    "all_pixel_inputs",
    "architecture_for_model_type",
    "expand_hooks",
    "lazy_attributes",
]
