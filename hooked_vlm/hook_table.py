"""Documented shape of each hook point, derived from its name (the README's hook table comes from here)."""

from __future__ import annotations

import re

# (suffix pattern, shape) in priority order; B batch, L positions (N patches in the vision tower),
# H heads, Hkv key/value heads, dh head dim, d width, m MLP width, M merged visual tokens.
_SHAPES: list[tuple[str, str]] = [
    (r"^unembed\.hook_in$", "B L d"),
    (r"^unembed\.hook_out$", "B L V"),
    (r"attn\.hook_(q|rot_q)$", "B L H dh"),
    (r"attn\.hook_(k|v|rot_k)$", "B L Hkv dh"),
    (r"attn\.(q_norm|k_norm)\.hook_scale$", "B L H(kv) 1"),
    (r"attn\.(q_norm|k_norm)\.hook_normalized$", "B L H(kv) dh"),
    (r"attn\.hook_(attn_scores|pattern)$", "B H Lq Lk"),
    (r"attn\.hook_z$", "B L H dh"),
    (r"attn\.hook_result$", "B L H d"),
    (r"attn\.hook_lse$", "B H L"),
    (r"attn\.hook_region$", "B H QG KG"),
    (r"attn\.hook_colsum$", "B H QG L"),
    (r"attn\.hook_rows$", "B H S L"),
    (r"attn\.hook_row_mass$", "B H L KG"),
    (r"merger\.mlp\.hook_(pre|post)$", "B M (merge^2 d_vision)"),
    (r"mlp\.hook_(pre|pre_linear|post)$", "B L m"),
    (r"projector\.mm_soft_emb_norm\.hook_scale$", "B M 1"),
    (r"projector\.mm_soft_emb_norm\.hook_normalized$", "B M d_vision"),
    (r"\.hook_scale$", "B L 1"),
    (r"\.hook_normalized$", "B L d"),
    (r"(merger|deepstack_merger_list\.\d+)\.hook_in$", "B M (merge^2 d_vision)"),
    (r"^projector\.hook_in$", "I T (k d_vision)"),  # LLaVA: the selected tower layer(s) per crop / frame
    (r"^vision\.hook_last_hidden$", "B L d"),
    (r"vision\.hook_out$", "B M d_model"),
    (r"projector\.hook_out$", "I T d_model"),  # one row per image / crop / frame (I), T tokens each
    (r"projector\.hook_pooled$", "B M d_vision"),
    (r"hook_(embed|resid_pre|resid_mid|resid_post|attn_out|mlp_out|patch_embed|pos_embed|deepstack)$", "B L d"),
]


def describe_hook(name: str) -> str:
    """The documented shape of hook ``name`` (vision-tower names use N patches for L)."""
    for pattern, shape in _SHAPES:
        if re.search(pattern, name):
            if name.startswith("vision."):
                shape = " ".join("N" if s in ("L", "Lq", "Lk") else s for s in shape.split())
            return shape
    return "see docstring"
