"""Attention maps from query groups to keys, computed from the attention-statistics kernels, never from L x L.

One forward runs on the model's fast path; hooks capture each attention layer's post-rotary ``q``, ``k`` and
its :class:`kernels.MaskSpec`, and :func:`kernels.weighted_colsum` turns them into what a group of queries
reads from every key (``W^T P``: torch's fused SDPA backward for plain causal / unmasked layers, the LSE and
column pass of the kernels for every other mask). Memory per layer is ``O(H * QG * L)``.

* :func:`attention_map` -> :class:`AttentionMap` ``[layers, B, H, QG, Lk]``: per-key attention of each query
  group (the mean over the group's queries, so every row sums to 1 over the keys), with views
  :meth:`AttentionMap.region` (key groups), :meth:`AttentionMap.grid` (an image or video as
  ``[frames, rows, cols]`` in merged-token cells) and :meth:`AttentionMap.shares` (image / text / BOS share).
* :func:`pool_grid`: a grid pooled to a dataset's own grid, ``mode="mass"`` (each cell's mass split over the
  target cells by area: totals preserved) or ``mode="distribution"`` (the same, renormalised to sum 1).
* :func:`relative_attention` (task prompt / generic prompt), :func:`fuse_heads` (mean / max / min /
  entropy-weighted), :func:`gradient_weighted_attention` (``A * ReLU(d metric / d A)`` on the query rows),
  :func:`two_hop_flow` (image -> text -> last token).

Query specs: ``"last"`` (each row's last token), ``"all"``, ``"text"``, ``"visual"``, a position, a list of
positions, or ``{name: positions}`` for several groups. Towers: ``"lm"`` (positions), ``"vision"`` (the vision
tower's rows, raster order; see ``layout.vision_rows``), ``"text"`` (a CLIP / SigLIP text tower).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.layout import BASE
from kernels import MaskSpec, attn_rows, colsum_with_lse, weighted_colsum

QuerySpec = str | int | Sequence[int] | Tensor | Mapping[str, Sequence[int] | Tensor]


class MethodNotApplicableError(ValueError):
    """The requested analysis cannot apply to this model or input (raised instead of returning a uniform map)."""


# --------------------------------------------------------------------------------------------- layer capture
@dataclass
class LayerQK:
    """One attention call as the kernels see it: post-rotary ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``."""

    layer: int
    q: Tensor
    k: Tensor
    mask: MaskSpec
    scale: float
    lse: Tensor | None = None  # the forward's row LSE [B, H, Lq] (``capture_qk(record_lse=True)``)


def attention_modules(model: nn.Module, tower: str = "lm") -> list[nn.Module]:
    """The attention modules of one tower: ``lm`` blocks, ``vision`` blocks, or a two-tower model's ``text``."""
    if tower == "lm":
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise MethodNotApplicableError(
                f"{type(model).__name__} has no language model; use tower='vision' or tower='text' for CLIP / SigLIP"
            )
    elif tower in ("vision", "text"):
        sub = getattr(model, tower, None)
        blocks = getattr(sub, "blocks", None)
        if blocks is None:
            raise MethodNotApplicableError(f"{type(model).__name__} has no {tower} tower with attention blocks")
    else:
        raise ValueError(f"tower must be 'lm', 'vision' or 'text', got {tower!r}")
    return [blk.attn for blk in blocks]


def _resolve_layers(layers: Sequence[int] | int | None, n: int, tower: str) -> list[int]:
    if layers is None:
        return list(range(n))
    out = [layers] if isinstance(layers, int) else list(layers)
    out = [i + n if i < 0 else i for i in out]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the {tower} tower has {n} attention layers (0..{n - 1})")
    return out


@contextmanager
def capture_qk(model: nn.Module, on_layer: Callable[[LayerQK], None], tower: str = "lm",
               layers: Sequence[int] | None = None, record_lse: bool = False) -> Iterator[None]:
    """Call ``on_layer`` with every chosen attention layer's q, k and MaskSpec during the enclosed forwards.

    ``record_lse=True`` (language model only) runs the chosen layers through the statistics path with nothing but
    the LSE requested (:class:`hooked_vlm.AttnStatsRequest`, ``backend="sdpa"``: the fused forward kernel where the
    mask allows it), so each :class:`LayerQK` also carries the row LSE the forward itself computed; a later column
    pass then needs one sweep, not two.
    """
    attns = attention_modules(model, tower)
    chosen = set(_resolve_layers(layers, len(attns), tower))
    if record_lse and tower != "lm":
        raise ValueError("record_lse applies to the language model's attention (tower='lm')")
    handles = []
    for i, attn in enumerate(attns):
        if i not in chosen:
            continue
        state: dict[str, Any] = {}

        def pre(mod, args, kwargs, state=state):
            state["mask"] = args[3] if len(args) > 3 else kwargs["mask"]

        def grab_q(mod, inp, out, state=state):
            state["q"] = out

        def grab_k(mod, inp, out, state=state, i=i, attn=attn):
            q = state.pop("q").detach().transpose(1, 2)
            s = LayerQK(i, q, out.detach().transpose(1, 2), state.pop("mask"), float(attn.scale))
            if record_lse:
                state["pending"] = s
            else:
                on_layer(s)

        def grab_lse(mod, inp, out, state=state):
            s = state.pop("pending")
            s.lse = out.detach()
            on_layer(s)

        handles += [
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.hook_rot_q.register_forward_hook(grab_q),
            attn.hook_rot_k.register_forward_hook(grab_k),
        ]
        if record_lse:
            handles.append(attn.hook_lse.register_forward_hook(grab_lse))
    try:
        if record_lse:
            from hooked_vlm import AttnStatsRequest, attn_stats_request

            with attn_stats_request(model, AttnStatsRequest(layers=sorted(chosen), backend="sdpa")):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()


def run_through(model: nn.Module, inputs: Mapping[str, Any], tower: str, layers: Sequence[int]) -> Any:
    """Run the forward only as far as the chosen attention layers need (``stop_at_layer``: no later blocks, no
    unembedding; for a VLM's vision tower, no language model at all)."""
    if getattr(model, "blocks", None) is None:  # CLIP / SigLIP: both towers run
        return model(**inputs)
    if tower == "lm":
        return model(**inputs, stop_at_layer=max(layers) + 1)
    return model(**inputs, stop_at_layer=0)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run with dropout off (``model.eval()``), restoring the caller's train/eval flags afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


# --------------------------------------------------------------------------------------------- query groups
def _layout_or_none(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    fn = getattr(model, "layout", None)
    if fn is None:
        return None
    try:
        return fn(**inputs)
    except NotImplementedError:
        return None


def query_weights(query: QuerySpec, layout: Any, length: int, batch: int) -> tuple[Float[Tensor, "b l qg"], list[str]]:
    """Dense query weights ``[B, L, QG]`` (each group's weights sum to 1: a mean over its queries) and names."""
    groups: dict[str, Tensor] = {}
    if isinstance(query, str):
        if query == "all":
            sel = torch.ones(batch, length)
            if layout is not None and layout.attention_mask is not None:
                sel = layout.attention_mask.float()
            groups["all"] = sel
        elif query in ("last", "text", "visual"):
            if layout is None:
                if query != "last":
                    raise MethodNotApplicableError(f"query={query!r} needs a token layout; pass positions instead")
                sel = torch.zeros(batch, length)
                sel[:, -1] = 1
            elif query == "last":
                sel = torch.zeros(batch, length)
                sel[torch.arange(batch), layout.last_token()] = 1
            elif query == "text":
                sel = (layout.kind == 0).float()
            else:
                sel = (layout.item >= 0).float()
            groups[query] = sel
        else:
            raise ValueError(f"unknown query {query!r}; use 'last', 'all', 'text', 'visual', positions or {{name: positions}}")
    elif isinstance(query, Mapping):
        for name, pos in query.items():
            groups[str(name)] = _positions_mask(pos, length, batch)
    else:
        groups["query"] = _positions_mask(query, length, batch)
    w = torch.stack(list(groups.values()), dim=-1)
    n = w.sum(1, keepdim=True)
    empty = [name for name, c in zip(groups, n[0, 0].tolist()) if c == 0]
    if empty:
        raise ValueError(f"query group(s) {empty} select no position")
    return w / n, list(groups)


def _positions_mask(pos: Any, length: int, batch: int) -> Tensor:
    idx = torch.as_tensor(pos, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < -length or int(idx.max()) >= length):
        raise ValueError(f"query positions {idx.tolist()} fall outside a sequence of {length} positions")
    sel = torch.zeros(batch, length)
    sel[:, idx % length] = 1
    return sel


# --------------------------------------------------------------------------------------------- the map
@dataclass
class AttentionMap:
    """Per-key attention ``values [layers, B, H, QG, Lk]`` from each query group (mean over its queries)."""

    values: Float[Tensor, "layers b h qg lk"]
    layers: list[int]
    queries: list[str]
    tower: str
    layout: Any = None
    meta: dict = field(default_factory=dict)

    def region(self, groups: Mapping[str, Sequence[int] | Tensor]) -> tuple[Float[Tensor, "layers b h qg kg"], list[str]]:
        """Mass on each named key group (positions), e.g. ``layout_groups(lay, by="frame")``."""
        cols = [self.values[..., torch.as_tensor(p, dtype=torch.long)].sum(-1) for p in groups.values()]
        return torch.stack(cols, dim=-1), list(groups)

    def grid(self, image: int | None = None, video: int | None = None, part: int | None = None) -> Float[Tensor, "layers h qg t rows cols"]:
        """One image / video's per-cell mass ``[layers, H, QG, frames, rows, cols]`` placed by the token layout."""
        return grid_view(self.values, self.layout, image=image, video=video, part=part, tower=self.tower)

    def shares(self) -> dict[str, Float[Tensor, "layers b h qg"]]:
        """Share of each query group's attention on image/video tokens, text, the first (BOS) token, special tokens."""
        if self.tower != "lm" or self.layout is None:
            raise MethodNotApplicableError("shares need the language model's token layout")
        return attention_shares(self.values, self.layout)


def attention_map(
    model: nn.Module,
    inputs: Mapping[str, Any],
    query: QuerySpec = "last",
    *,
    tower: str = "lm",
    layers: Sequence[int] | int | None = None,
    heads: str = "per_head",
    backend: str | None = None,
) -> AttentionMap:
    """What each query group reads from every key, per layer and head, without an L x L matrix.

    ``query`` for ``tower="vision"`` / ``"text"`` are rows of that tower (``layout.vision_rows``; ``[0]`` is
    CLIP's ``[CLS]``). ``heads="mean"`` averages the heads inside the kernel.
    """
    layout = _layout_or_none(model, inputs)  # None for CLIP / SigLIP
    found: dict[int, Tensor] = {}
    names: list[str] = []

    def on_layer(s: LayerQK) -> None:
        nonlocal names
        b, _, lq, _ = s.q.shape
        w, names = query_weights(query, layout if tower == "lm" else None, lq, b)
        found[s.layer] = weighted_attention(s, w, heads=heads, backend=backend).cpu()

    chosen = _resolve_layers(layers, len(attention_modules(model, tower)), tower)
    with eval_mode(model), torch.no_grad(), capture_qk(model, on_layer, tower, chosen, record_lse=tower == "lm"):
        run_through(model, inputs, tower, chosen)
    missing = [i for i in chosen if i not in found]
    if missing:
        raise MethodNotApplicableError(f"attention layers {missing} of the {tower} tower did not run in this forward")
    return AttentionMap(torch.stack([found[i] for i in chosen]), chosen, names, tower, layout)


ROWS_LIMIT = 64


def weighted_attention(s: LayerQK, w: Float[Tensor, "b lq qg"], heads: str = "per_head", backend: str | None = None,
                       rows_limit: int = ROWS_LIMIT) -> Float[Tensor, "b h qg lk"]:
    """``W^T P`` for one layer: from exact rows (:func:`kernels.attn_rows`, cost ``S x L``) when the groups use at
    most ``rows_limit`` query positions, else the column pass: one sweep with the forward's LSE when it was
    recorded (:func:`kernels.colsum_with_lse`), else :func:`kernels.weighted_colsum`."""
    used = (w != 0).any(-1).any(0).nonzero().flatten()
    if used.numel() <= rows_limit:
        probs, _ = attn_rows(s.q, s.k, used.to(s.q.device), s.mask, lse=s.lse, scale=s.scale, backend=backend)  # B H S Lk
        out = torch.einsum("bsc,bhsk->bhck", w[:, used].to(probs), probs)
        if heads == "mean":
            return out.mean(1, keepdim=True)
        if heads == "per_head":
            return out
        raise ValueError(f"heads must be 'per_head' or 'mean', got {heads!r}")
    if s.lse is not None:
        return colsum_with_lse(s.q, s.k, s.lse, s.mask, w.to(s.q.device), heads=heads, scale=s.scale, backend=backend)
    return weighted_colsum(s.q, s.k, s.mask, w.to(s.q.device), heads=heads, scale=s.scale, backend=backend)


# --------------------------------------------------------------------------------------------- grid views
def grid_view(values: Tensor, layout: Any, image: int | None = None, video: int | None = None, part: int | None = None,
              tower: str = "lm") -> Tensor:
    """Place per-key values ``[..., B, H, QG, L]`` of one item into ``[..., H, QG, frames, rows, cols]``.

    LM: a cell is a merged token at its layout (frame, row, col); LLaVA-NeXT / OneVision default to the any-res
    grid (``part=GRID``: the crops stitched back into the image; newline tokens dropped), else the base crop.
    Vision tower: the item's patch view of :func:`item_patch_grid` (Qwen / Gemma 3 patch grid, LLaVA frames, any-res
    crops stitched into the image; ``part=BASE`` for the base crop).
    """
    if layout is None:
        raise MethodNotApplicableError("grid views need a token layout (model.layout); this model has none")
    item_id, it = layout.find_item(image, video)
    if tower == "vision":  # [..., B, H, QG, N] -> the item's patch view [..., H, QG, frames, rows, cols]
        v = values.movedim(-4, 0).movedim(-1, 1)  # B N ... H QG (the batch-first layout of tower activations)
        return item_patch_grid(layout, v, image, video, part).movedim((0, 1, 2), (-3, -2, -1))
    b = it.batch
    sel = layout.item[b] == item_id
    sel &= (layout.row[b] >= 0) & (layout.col[b] >= 0)
    lay_part = getattr(layout, "part", None)
    if lay_part is not None:
        if part is None:
            part = layout.default_part(image, video)
        sel &= lay_part[b] == part
    pos = sel.nonzero().flatten()
    f, r, c = (t[b][pos].clamp(min=0) for t in (layout.frame, layout.row, layout.col))
    shape = (int(f.max()) + 1, int(r.max()) + 1, int(c.max()) + 1)
    src = values[..., b, :, :, :][..., pos.to(values.device)]
    out = torch.zeros(*src.shape[:-1], shape[0] * shape[1] * shape[2], dtype=src.dtype)
    out[..., (f * shape[1] * shape[2] + r * shape[2] + c).to(out.device)] = src
    return out.reshape(*src.shape[:-1], *shape)


def item_patch_grid(layout: Any, act: Tensor, image: int | None = 0, video: int | None = None,
                    part: int | None = None) -> Float[Tensor, "t rows cols d"]:
    """One item's vision-tower tokens ``[frames, rows, cols, d]`` from a batch-first tower activation of ONE prompt
    copy, placed by the token layout.

    Qwen images / videos and Gemma 3 -> the patch grid ``grid_thw`` (video: one grid per temporal slice);
    LLaVA-NeXT-Video / OneVision video -> one ``side x side`` grid per frame; LLaVA-NeXT / OneVision any-res
    images -> the high-resolution crops stitched into the image, padding cut (``part=BASE``: the base crop);
    LLaVA 1.5 -> the patch grid of its one crop. The trailing axes of ``act`` ride along.
    """
    _, it = layout.find_item(image, video)
    if getattr(layout, "part", None) is None:  # Qwen / Gemma 3: the item's patch grid grid_thw
        return layout.vision_grid(act, image=image, video=video)
    if it.kind == "video":  # LLaVA-NeXT-Video / OneVision: one tower row per frame
        return torch.stack([layout.vision_grid(act, video=video, frame=f) for f in range(it.n_rows)])
    n_crops = layout.n_crops(image)
    if part == BASE or n_crops == 0:
        return layout.vision_grid(act, image=image, crop=0)[None]
    crops = [layout.vision_grid(act, image=image, crop=1 + i) for i in range(n_crops)]  # raster order of the crop grid
    return layout.stitch_crops(torch.stack(crops), image)[None]  # the image inside the best-resolution canvas


def _overlap(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: fraction of input cell j that falls in output cell i (columns sum to 1)."""
    edges_in = np.arange(n_in + 1) / n_in
    edges_out = np.arange(n_out + 1) / n_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0, None) * n_in


def pool_grid(grid: Tensor | np.ndarray, size: tuple[int, int] | int, mode: str = "mass") -> Tensor:
    """Pool the last two axes of ``grid`` to ``size = (rows, cols)`` (e.g. 24x24 LLaVA tokens -> a 10x10 task grid).

    ``mode="mass"``: each input cell's mass is split over the output cells in proportion to overlapping area, so
    every total is preserved (what "how much attention fell in this cell" means). ``mode="distribution"``: the
    same, renormalised so each map sums to 1. ``mode="mean"``: area-weighted mean value (densities, saliency).
    """
    g = torch.as_tensor(grid, dtype=torch.float64)
    rows, cols = (size, size) if isinstance(size, int) else size
    ry = torch.as_tensor(_overlap(g.shape[-2], rows))
    rx = torch.as_tensor(_overlap(g.shape[-1], cols))
    if mode == "mean":
        ry = ry / ry.sum(1, keepdim=True)
        rx = rx / rx.sum(1, keepdim=True)
    elif mode not in ("mass", "distribution"):
        raise ValueError(f"mode must be 'mass', 'distribution' or 'mean', got {mode!r}")
    out = ry @ g @ rx.T
    if mode == "distribution":
        total = out.sum(dim=(-2, -1), keepdim=True)
        out = out / torch.where(total == 0, torch.ones_like(total), total)
    return out.float()


# --------------------------------------------------------------------------------------------- derived maps
def relative_attention(task: Tensor, generic: Tensor, eps: float = 1e-8) -> Tensor:
    """Task-prompt attention divided by generic-prompt attention ("MLLMs know where to look"), per cell."""
    if task.shape != generic.shape:
        raise ValueError(f"task {tuple(task.shape)} and generic {tuple(generic.shape)} maps must have one shape (same image)")
    return task / (generic + eps)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    p = p / p.sum(dim, keepdim=True).clamp_min(1e-30)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def fuse_heads(values: Tensor, how: str = "mean", head_dim: int = -3, eps: float = 1e-6) -> Tensor:
    """Fuse the head axis: ``mean``, ``max``, ``min`` or ``entropy`` (weights ``1 / (H_h + eps)``, normalised,
    where ``H_h`` is head h's entropy over the keys: focused heads count more)."""
    if how == "mean":
        return values.mean(head_dim)
    if how == "max":
        return values.amax(head_dim)
    if how == "min":
        return values.amin(head_dim)
    if how == "entropy":
        w = 1.0 / (_entropy(values, -1) + eps)  # the key axis is gone: a negative head axis moves up by one
        w = w / w.sum(head_dim + 1 if head_dim < 0 else head_dim, keepdim=True)
        return (values * w.unsqueeze(-1)).sum(head_dim)
    raise ValueError(f"head fusion must be 'mean', 'max', 'min' or 'entropy', got {how!r}")


def attention_shares(values: Tensor, layout: Any) -> dict[str, Tensor]:
    """``image`` (image + video tokens), ``text``, ``bos`` (first non-padding position) and ``special`` shares."""
    kind = layout.kind
    b = kind.shape[0]
    first = torch.zeros(b, dtype=torch.long)
    if layout.attention_mask is not None:
        first = layout.attention_mask.long().argmax(1)
    bos = torch.zeros_like(kind, dtype=torch.bool)
    bos[torch.arange(b), first] = True
    masks = {"image": (kind == 1) | (kind == 2), "text": (kind == 0) & ~bos, "bos": bos, "special": (kind == 3) & ~bos}
    out = {}
    for name, m in masks.items():
        mm = m.to(values.dtype)[:, None, None, :]  # B 1 1 L
        out[name] = (values * mm).sum(-1)
    return out


def gradient_weighted_attention(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Callable[[Tensor], Tensor],
    query: Sequence[int] | int = -1,
    *,
    layers: Sequence[int] | int | None = None,
    tower: str = "lm",
) -> tuple[Float[Tensor, "layers b h s lk"], Float[Tensor, "layers b h s lk"]]:
    """``(A, A * ReLU(d metric / d A))`` on the query rows only, per layer and head.

    The rows ``A[q, :]`` are recomputed differentiably from the layer's q, k and mask (rows only) and substituted
    into the layer's mixed values (``hook_z``); their gradient is the one the materialised ``hook_pattern`` rows
    would get (later layers keep their q / k paths), with memory ``O(H * S * L)`` per layer.
    ``metric`` maps the model output (logits) to a scalar or one value per row (summed).
    """
    attns = attention_modules(model, tower)
    chosen = _resolve_layers(layers, len(attns), tower)
    rows_t = torch.as_tensor(query, dtype=torch.long).reshape(-1)
    leaves: dict[int, Tensor] = {}
    handles = []
    for i in chosen:
        attn = attns[i]
        state: dict[str, Any] = {}

        def pre(mod, args, kwargs, state=state):
            state["mask"] = args[3] if len(args) > 3 else kwargs["mask"]

        def grab(name):
            def fn(mod, inp, out, state=state):
                state[name] = out
            return fn

        def swap_z(mod, inp, z, state=state, i=i, attn=attn):
            q, k, v = state["q"], state["k"], state["v"]  # [B, L, H(kv), dh], still in the autograd graph
            lq, lk = q.shape[1], k.shape[1]
            rows = rows_t % lq
            rep = attn.n_heads // attn.n_kv_heads
            kk = k.repeat_interleave(rep, dim=2) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=2) if rep > 1 else v
            rm = state["mask"].resolve(q.shape[0], lq, lk, q.device)
            off = state["mask"].offset(lq, lk)
            vis = torch.stack([rm.visible(b, rows + off, 0, lk) for b in range(q.shape[0])])  # B S Lk
            scores = torch.einsum("bshd,bkhd->bhsk", q[:, rows], kk) * attn.scale
            probs = torch.softmax(scores.float().masked_fill(~vis[:, None], float("-inf")), -1)
            probs = torch.nan_to_num(probs, nan=0.0).to(z.dtype)
            probs.retain_grad()
            leaves[i] = probs
            z = z.clone()
            z[:, rows] = torch.einsum("bhsk,bkhd->bshd", probs, vv)
            return z

        handles += [
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.hook_rot_q.register_forward_hook(grab("q")),
            attn.hook_rot_k.register_forward_hook(grab("k")),
            attn.hook_v.register_forward_hook(grab("v")),
            attn.hook_z.register_forward_hook(swap_z),
        ]
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(**inputs)
            value = metric(out).sum()
            grads = torch.autograd.grad(value, [leaves[i] for i in chosen], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    a = torch.stack([leaves[i].detach() for i in chosen])
    g = torch.stack([torch.zeros_like(leaves[i]) if gr is None else gr for i, gr in zip(chosen, grads)])
    return a, a * g.clamp(min=0)


def two_hop_flow(
    model: nn.Module,
    inputs: Mapping[str, Any],
    source: Sequence[int] | Tensor,
    via: Sequence[int] | Tensor,
    target: int = -1,
    *,
    layers: Sequence[int] | None = None,
) -> Float[Tensor, "layers layers"]:
    """Indirect flow ``F[l1, l2] = sum_{t in via} A_{l2}(target -> t) * A_{l1}(t -> source)`` (head means).

    E.g. image -> text -> last token: how much the last token reads text tokens at layer ``l2`` that themselves
    read the image at layer ``l1``. Entries with ``l1 >= l2`` are NaN (no path). Batch row 0.
    """
    via_t = torch.as_tensor(via, dtype=torch.long).reshape(-1)
    src_t = torch.as_tensor(source, dtype=torch.long).reshape(-1)
    found: dict[int, tuple[Tensor, Tensor]] = {}

    def on_layer(s: LayerQK) -> None:
        lq = s.q.shape[2]
        # A(t -> source) for every via query t: the column pass with one-hot query weights is S x L; rows are cheaper
        probs_via, _ = attn_rows(s.q[:1], s.k[:1], via_t % lq, s.mask, scale=s.scale)
        probs_tgt, _ = attn_rows(s.q[:1], s.k[:1], torch.tensor([target % lq]), s.mask, scale=s.scale)
        to_src = probs_via[0][..., src_t].sum(-1).mean(0)  # [S]
        tgt_via = probs_tgt[0, :, 0, via_t % lq].mean(0)  # [S] (head mean)
        found[s.layer] = (to_src.cpu(), tgt_via.cpu())

    chosen = _resolve_layers(layers, len(attention_modules(model, "lm")), "lm")
    with eval_mode(model), torch.no_grad(), capture_qk(model, on_layer, "lm", chosen):
        run_through(model, inputs, "lm", chosen)
    n = len(chosen)
    out = torch.full((n, n), float("nan"))
    for a, l1 in enumerate(chosen):
        for c, l2 in enumerate(chosen):
            if l1 < l2:
                out[a, c] = (found[l2][1] * found[l1][0]).sum()
    return out
