"""Patchable sites: short names for hook-name families and how to index their activations.

A sweep never reaches into a model; it only needs, for every kind of activation, the hook name of
layer ``i`` and which axes hold positions and heads. This module is that table, following the
TransformerLens naming the hooked models use (``blocks.{i}.hook_resid_pre``,
``blocks.{i}.attn.hook_z``, ``vision.blocks.{j}.hook_resid_post``, ...).

Head counts are read from the activations themselves, so grouped-query attention is honest: ``k``
and ``v`` sites have ``n_key_value_heads`` heads and no cells are produced for heads that do not
exist (tables show NaN there, never a placeholder 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Site", "SITES", "get_site", "available_layers"]


@dataclass(frozen=True)
class Site:
    """How to find and index one family of activations.

    Attributes:
        name: short name used in sweeps and result tables (``"resid_pre"``, ``"z"``, ``"vision.resid_post"``).
        template: hook name with ``{layer}`` (or no placeholder for layer-less sites).
        pos_axis: axis holding sequence positions (query positions for patterns); for vision sites the
            axis holding patches (raster order).
        head_axis: axis holding heads, or None for whole-layer sites.
        vision: whether the site lives in the vision tower (patching it re-runs the tower per variant).
    """

    name: str
    template: str
    pos_axis: int = 1
    head_axis: int | None = None
    vision: bool = False

    @property
    def has_layers(self) -> bool:
        return "{layer}" in self.template

    def hook_name(self, layer: int | None) -> str:
        if self.has_layers:
            if layer is None:
                raise ValueError(f"site {self.name!r} needs a layer")
            return self.template.format(layer=layer)
        return self.template


_LM = [
    Site("embed", "hook_embed"),
    Site("resid_pre", "blocks.{layer}.hook_resid_pre"),
    Site("resid_mid", "blocks.{layer}.hook_resid_mid"),
    Site("resid_post", "blocks.{layer}.hook_resid_post"),
    Site("attn_out", "blocks.{layer}.hook_attn_out"),
    Site("mlp_out", "blocks.{layer}.hook_mlp_out"),
    Site("z", "blocks.{layer}.attn.hook_z", head_axis=2),
    Site("q", "blocks.{layer}.attn.hook_q", head_axis=2),
    Site("k", "blocks.{layer}.attn.hook_k", head_axis=2),
    Site("v", "blocks.{layer}.attn.hook_v", head_axis=2),
    Site("result", "blocks.{layer}.attn.hook_result", head_axis=2),
    Site("pattern", "blocks.{layer}.attn.hook_pattern", pos_axis=2, head_axis=1),
    Site("attn_scores", "blocks.{layer}.attn.hook_attn_scores", pos_axis=2, head_axis=1),
    Site("mlp_post", "blocks.{layer}.mlp.hook_post"),
]
_VISION = [
    Site("vision.patch_embed", "vision.hook_patch_embed", vision=True),
    Site("vision.resid_pre", "vision.blocks.{layer}.hook_resid_pre", vision=True),
    Site("vision.resid_mid", "vision.blocks.{layer}.hook_resid_mid", vision=True),
    Site("vision.resid_post", "vision.blocks.{layer}.hook_resid_post", vision=True),
    Site("vision.attn_out", "vision.blocks.{layer}.hook_attn_out", vision=True),
    Site("vision.mlp_out", "vision.blocks.{layer}.hook_mlp_out", vision=True),
    Site("vision.z", "vision.blocks.{layer}.attn.hook_z", head_axis=2, vision=True),
    Site("vision.out", "vision.hook_out", vision=True),
]
SITES: dict[str, Site] = {s.name: s for s in _LM + _VISION}


def get_site(site: str | Site) -> Site:
    """Look up a site by short name; unknown names raise with the list of valid ones."""
    if isinstance(site, Site):
        return site
    try:
        return SITES[site]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(site, SITES, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown site {site!r}.{hint} Valid sites: {sorted(SITES)}") from None


def available_layers(hook_names: object, site: Site) -> list[int]:
    """Layers ``i`` for which ``site``'s hook exists among ``hook_names`` (e.g. ``model.hook_dict``)."""
    if not site.has_layers:
        return []
    pattern = re.compile("^" + re.escape(site.template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    layers = {int(m.group(1)) for n in hook_names if (m := pattern.match(n))}
    return sorted(layers)
