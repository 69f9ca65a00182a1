"""The four explanations of a composed-retrieval query, with Grad-ECLIP and gradient x activation.

Score of candidate ``c``: ``s_c = cos(E_img(c), E_txt("a photo of $ that CAPTION", $ = phi(E_img(ref))))``.

1. **reference map**: target ``||phi(E_img(ref))||_2`` -> the reference's vision tower (where phi looks).
2. **per-candidate reference map**: ``s_c`` -> the reference, through phi and the text tower.
3. **candidate map**: ``s_c`` -> the candidate's vision tower.
4. **text attribution**: ``s_c`` -> the text tower's tokens (the pseudo-word included).

Plus the **difference map** of each candidate: its map (3) minus map (3) of the reference placed as the candidate
(which regions of the candidate carry more evidence for the query than the reference's); exactly zero for a
candidate identical to the reference when the model is deterministic (eval mode, dropout off).

Methods, both on the pooled token of each tower's last attention (CLIP ``[CLS]`` / SigLIP's MAP probe / the text's
pooled position), one value per patch / token at the input's own grid:

* ``eclip``: Grad-ECLIP (:func:`analyses.attribution.eclip_map`): ``ReLU(sum_c w_c v_jc lambda_j)``;
* ``gradxact``: gradient x activation on the last block's input tokens: ``ReLU(sum_c a_jc dS/da_jc)`` (images),
  signed for text tokens.

Every map is computed with the model and phi in eval mode; the score is the one retrieval ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from analyses.attention_maps import eval_mode
from analyses.attribution import eclip_map

__all__ = ["METHODS", "Explanation", "composed_embedding", "explain_query", "upsample"]

METHODS = ("eclip", "gradxact")


@dataclass(frozen=True)
class _Sites:
    attn: str  # prefix of the pooled token's attention (hook_q / hook_k / hook_v / hook_z)
    act: str  # the last block's input (gradient x activation)
    first: int  # first patch row (1 after CLIP's [CLS])

    @property
    def names(self) -> list[str]:
        return [f"{self.attn}.{h}" for h in ("hook_q", "hook_k", "hook_v", "hook_z")] + [self.act]


def _vision_sites(model: nn.Module) -> _Sites:
    spec = model.vision.spec
    last = spec.depth - 1
    attn = "vision.head.attn" if model.vision.head is not None else f"vision.blocks.{last}.attn"
    return _Sites(attn, f"vision.blocks.{last}.hook_resid_pre", 1 if spec.has_cls else 0)


def _text_sites(model: nn.Module) -> _Sites:
    last = model.text.depth - 1
    return _Sites(f"text.blocks.{last}.attn", f"text.blocks.{last}.hook_resid_pre", 0)


def _keep(store: dict[str, Tensor], names: Sequence[str]) -> list[tuple[str, Any]]:
    def keep(x: Tensor, hook: Any) -> Tensor:
        store[hook.name] = x
        return x

    return [(n, keep) for n in names]


def _inject(composed: Any, word: Tensor) -> tuple[str, Any]:
    from hooked_vlm.organisms.shapes_clip import pseudo_word_embeds

    def put(x: Tensor, hook: Any) -> Tensor:
        return pseudo_word_embeds(x, composed.input_ids.to(x.device), composed.pseudo_id, word)

    return ("text.hook_token_embed", put)


def composed_embedding(model: nn.Module, phi: nn.Module, reference: Float[Tensor, "1 3 h w"], composed: Any) -> Float[Tensor, "1 d"]:
    """The composed query's text embedding (no gradients): what retrieval ranks the database by."""
    with eval_mode(model), eval_mode(phi), torch.no_grad():
        word = phi(model.encode_image(reference))
        with model.hooks(fwd_hooks=[_inject(composed, word)]):
            return model.encode_text(composed.input_ids, composed.attention_mask)


@dataclass
class Explanation:
    """Maps of one query on each image's patch grid ``[rows, cols]`` and text attributions ``[tokens]``, per method."""

    reference: dict[str, Tensor]
    reference_as_candidate: dict[str, Tensor]
    reference_text: dict[str, Tensor]
    scores: list[float] = field(default_factory=list)
    candidates: list[dict[str, Tensor]] = field(default_factory=list)
    candidate_reference: list[dict[str, Tensor]] = field(default_factory=list)
    differences: list[dict[str, Tensor]] = field(default_factory=list)
    text: list[dict[str, Tensor]] = field(default_factory=list)
    reference_score: float = 0.0


def _grid(model: nn.Module, rows: Tensor, pixels: Tensor) -> Tensor:
    p = model.vision.spec.patch_size
    return rows.reshape(pixels.shape[-2] // p, pixels.shape[-1] // p)


def _image_maps(model: nn.Module, s: _Sites, store: dict[str, Tensor], g_z: Tensor, g_act: Tensor, pixels: Tensor,
                methods: Sequence[str]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if "eclip" in methods:
        q, k, v = (store[f"{s.attn}.{h}"] for h in ("hook_q", "hook_k", "hook_v"))
        out["eclip"] = _grid(model, eclip_map(q[0, 0], k[0, s.first:], v[0, s.first:], g_z[0, 0]), pixels)
    if "gradxact" in methods:
        a = store[s.act].detach()
        out["gradxact"] = _grid(model, (a[0, s.first:] * g_act[0, s.first:]).sum(-1).clamp(min=0), pixels)
    return out


def _text_maps(model: nn.Module, s: _Sites, store: dict[str, Tensor], g_z: Tensor, g_act: Tensor, input_ids: Tensor,
               methods: Sequence[str]) -> dict[str, Tensor]:
    p = int(model.text.pool_positions(input_ids)[0])
    last = p + 1 if model.text.spec.causal else input_ids.shape[1]
    out: dict[str, Tensor] = {}
    if "eclip" in methods:
        q, k, v = (store[f"{s.attn}.{h}"] for h in ("hook_q", "hook_k", "hook_v"))
        values = torch.zeros(input_ids.shape[1])
        values[:last] = eclip_map(q[0, p], k[0, :last], v[0, :last], g_z[0, p]).cpu()
        out["eclip"] = values
    if "gradxact" in methods:
        values = torch.zeros(input_ids.shape[1])
        values[:last] = (store[s.act].detach()[0, :last] * g_act[0, :last]).sum(-1).cpu()
        out["gradxact"] = values
    return out


def explain_query(model: nn.Module, phi: nn.Module, reference: Float[Tensor, "1 3 h w"], composed: Any,
                  candidates: Sequence[Float[Tensor, "1 3 h w"]], methods: Sequence[str] = METHODS) -> Explanation:
    """The four explanations (and difference maps) of one query for each candidate, with each method in ``methods``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown saliency method(s) {unknown}; choose from {list(METHODS)}")
    vs, ts = _vision_sites(model), _text_sites(model)
    with eval_mode(model), eval_mode(phi), torch.enable_grad():
        ref_store: dict[str, Tensor] = {}
        with model.hooks(fwd_hooks=_keep(ref_store, vs.names)):
            ref_emb = model.encode_image(reference)
        word = phi(ref_emb)
        g_z, g_act = torch.autograd.grad(word.norm(), [ref_store[f"{vs.attn}.hook_z"], ref_store[vs.act]], retain_graph=True)
        ref_map = _image_maps(model, vs, ref_store, g_z, g_act, reference, methods)
        text_store: dict[str, Tensor] = {}
        with model.hooks(fwd_hooks=[_inject(composed, word)] + _keep(text_store, ts.names)):
            text_emb = model.encode_text(composed.input_ids, composed.attention_mask)

        def score(pixels: Tensor) -> tuple[float, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
            store: dict[str, Tensor] = {}
            with model.hooks(fwd_hooks=_keep(store, vs.names)):
                emb = model.encode_image(pixels)
            s = nn.functional.cosine_similarity(emb, text_emb, dim=-1).sum()
            wrt = [store[f"{vs.attn}.hook_z"], store[vs.act], ref_store[f"{vs.attn}.hook_z"], ref_store[vs.act],
                   text_store[f"{ts.attn}.hook_z"], text_store[ts.act]]
            g = torch.autograd.grad(s, wrt, retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
            return (float(s.detach()), _image_maps(model, vs, store, g[0], g[1], pixels, methods),
                    _image_maps(model, vs, ref_store, g[2], g[3], reference, methods),
                    _text_maps(model, ts, text_store, g[4], g[5], composed.input_ids, methods))

        ref_score, as_candidate, _, ref_text = score(reference)
        out = Explanation({k: v.detach().cpu() for k, v in ref_map.items()}, as_candidate, ref_text, reference_score=ref_score)
        for pixels in candidates:
            s, cand, cand_ref, text = score(pixels)
            out.scores.append(s)
            out.candidates.append(cand)
            out.candidate_reference.append(cand_ref)
            out.text.append(text)
            out.differences.append({m: _difference(cand[m], as_candidate[m]) for m in methods})
    return out


def _difference(candidate: Tensor, reference: Tensor) -> Tensor:
    """Candidate map minus the reference-as-candidate map, on the candidate's grid."""
    if candidate.shape != reference.shape:
        reference = upsample(reference, tuple(candidate.shape))
    return candidate - reference


def upsample(grid: Float[Tensor, "rows cols"], size: tuple[int, int]) -> Float[Tensor, "h w"]:
    """A patch-grid map at ``size`` pixels (bilinear; non-negative maps stay non-negative)."""
    return nn.functional.interpolate(grid[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
