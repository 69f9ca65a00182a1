"""Gradient attributions for the hooked VLMs and CLIP / SigLIP: integrated gradients, saliency, Grad-CAM, Grad-ECLIP.

* :func:`integrated_gradients` on ``pixels`` (through the vision tower: the pixel-input path is kept),
  ``visual_embeds`` or ``text_embeds`` (the language model's input ``hook_embed`` at visual / text positions; for
  CLIP / SigLIP ``vision.hook_embed`` / ``text.hook_embed``), with ``black`` / ``blur`` / ``mean`` / ``zero``
  baselines (or a tensor). Interpolation steps run in batches of ``batch_size`` copies of the prompt, so memory
  is bounded by one batch whatever ``steps`` is. Every result carries its completeness check:
  ``sum(attributions)`` against ``f(x) - f(baseline)``.
* :func:`gradient_saliency`: plain gradient or input x gradient, with the optional high-pass filter of "MLLMs
  know where to look" (map minus its Gaussian blur, clipped at 0).
* :func:`grad_cam`: Grad-CAM on vision-tower tokens, one map per answer token of a generative VLM.
* :func:`grad_eclip`: Grad-ECLIP (Zhao et al., ICML 2024) for CLIP / SigLIP image and text towers.
* :func:`attribution_grid`: any attribution reduced to the token-layout grid used by attention maps.

Models always run in eval mode (dropout off) for the call; the caller's train/eval flags are restored after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vlm.layout import BASE
from analyses.attention_maps import (
    MethodNotApplicableError,
    _layout_or_none,
    eval_mode,
    grid_view,
    item_patch_grid,
    pool_grid,
)

Metric = Callable[[Any], Tensor]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def __getattr__(name: str) -> Any:
    """Deprecated alias: ``PIXEL_KEYS`` (every registered family's pixel inputs; read ``model.input_schema().pixels``)."""
    if name == "PIXEL_KEYS":
        from hooked_vlm.families.registry import all_pixel_inputs

        return all_pixel_inputs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pixel_inputs(model: nn.Module | None) -> tuple[str, ...]:
    """The model's pixel inputs (its input schema); without a model, those of every registered family."""
    from hooked_vlm.families.registry import all_pixel_inputs

    schema = getattr(model, "input_schema", None)
    return schema().pixels if schema is not None else all_pixel_inputs()


# --------------------------------------------------------------------------------------------- inputs
def tile_inputs(inputs: Mapping[str, Any], k: int, model: nn.Module | None = None) -> dict[str, Any]:
    """``k`` copies of a one-prompt input along the batch (every per-prompt and per-image tensor tiled on dim 0).

    With a generative ``model``, a batch of several prompts is refused (attributions run on one prompt at a time);
    a two-tower model's ``input_ids`` rows are texts and may be many."""
    ids = inputs.get("input_ids")
    if getattr(model, "generative", False) and isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] != 1:
        raise ValueError(f"attribution runs on one prompt at a time; got a batch of {ids.shape[0]}: loop over prompts")
    return {n: (v.repeat(k, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) and v.ndim > 0 else v) for n, v in inputs.items()}


def pixel_key(inputs: Mapping[str, Any], key: str | None = None, model: nn.Module | None = None) -> str:
    """The pixel tensor to attribute: ``key`` or the only one of the model's pixel inputs present."""
    if key is not None:
        if key not in inputs:
            raise KeyError(f"{key!r} is not among the inputs {sorted(inputs)}")
        return key
    present = [k for k in _pixel_inputs(model) if inputs.get(k) is not None]
    if len(present) != 1:
        raise MethodNotApplicableError(
            f"pixel attribution needs exactly one pixel tensor, found {present or 'none'}; pass pixel_key='...' "
            "(or target='text_embeds' for a text-only input)"
        )
    return present[0]


def unpack_qwen_pixels(rows: Float[Tensor, "n dim"], item: Any) -> Float[Tensor, "frames c h w"]:
    """An item's packed Qwen patch rows -> its frames ``[t * temporal_patch, C, H, W]`` (inverse of the packing)."""
    t, gh, gw = item.grid_thw
    m, p, tp = item.merge, item.patch_size, item.temporal_patch_size
    c = rows.shape[-1] // (tp * p * p)
    x = rows[item.pixel_offset : item.pixel_offset + t * gh * gw]
    x = x.reshape(t, gh // m, gw // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * tp, c, gh * p, gw * p)


def pack_qwen_pixels(frames: Float[Tensor, "frames c h w"], item: Any) -> Float[Tensor, "n dim"]:
    """Inverse of :func:`unpack_qwen_pixels`: frames -> the item's packed patch rows."""
    t, gh, gw = item.grid_thw
    m, p, tp = item.merge, item.patch_size, item.temporal_patch_size
    c = frames.shape[1]
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, c * tp * p * p)


def _is_packed(x: Tensor) -> bool:
    return x.ndim == 2


def _pixel_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    name = type(model).__name__.lower()
    arch = str(getattr(getattr(model, "cfg", None), "architecture", "")).lower()
    if "gemma" in name or "siglip" in arch or "onevision" in arch or getattr(getattr(model, "cfg", None), "family", "") == "siglip":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return CLIP_MEAN, CLIP_STD


def _blur_frames(x: Tensor, sigma: float) -> Tensor:
    from scipy.ndimage import gaussian_filter

    arr = x.detach().double().cpu().numpy()
    sig = [0] * (arr.ndim - 2) + [sigma, sigma]
    return torch.as_tensor(gaussian_filter(arr, sigma=sig, mode="nearest"), dtype=x.dtype)


def pixel_baseline(model: nn.Module, inputs: Mapping[str, Any], kind: str | Tensor = "black", *, key: str | None = None,
                   sigma: float = 10.0, norm: tuple[Sequence[float], Sequence[float]] | None = None) -> Tensor:
    """Baseline for the (normalised) pixel tensor: ``black`` (0 in pixel space), ``zero`` (0 after normalisation,
    i.e. the processor's mean colour), ``mean`` (the image's own per-channel mean), ``blur`` (Gaussian, ``sigma`` px)."""
    key = pixel_key(inputs, key, model)
    x = inputs[key]
    if isinstance(kind, Tensor):
        if kind.shape != x.shape:
            raise ValueError(f"baseline has shape {tuple(kind.shape)}; {key} has {tuple(x.shape)}")
        return kind.to(x.dtype)
    packed = _is_packed(x)
    if packed:
        layout = _layout_or_none(model, inputs)
        items = [it for it in layout.items if layout.pixel_input(it.kind) == key]
        frames = [unpack_qwen_pixels(x, it) for it in items]
    else:
        frames = [x]
    mean, std = norm if norm is not None else _pixel_norm(model)

    def make(f: Tensor) -> Tensor:
        cdim = f.ndim - 3
        shape = [1] * f.ndim
        shape[cdim] = -1
        if kind == "zero":
            return torch.zeros_like(f)
        if kind == "black":
            m = torch.as_tensor(mean, dtype=f.dtype).reshape(shape)
            s = torch.as_tensor(std, dtype=f.dtype).reshape(shape)
            return ((0 - m) / s).expand_as(f).clone()
        if kind == "mean":
            return f.mean(dim=(-2, -1), keepdim=True).expand_as(f).clone()
        if kind == "blur":
            return _blur_frames(f, sigma)
        raise ValueError(f"unknown baseline {kind!r}; use black, blur, mean, zero or a tensor")

    made = [make(f) for f in frames]
    if not packed:
        return made[0]
    out = x.clone()
    for it, f in zip(items, made):
        out[it.pixel_offset : it.pixel_offset + it.n_patches] = pack_qwen_pixels(f, it)
    return out


# --------------------------------------------------------------------------------------------- results
@dataclass
class Attribution:
    """Attributions with the input they explain (``values`` has the input's shape) and the completeness check."""

    values: Tensor
    target: str
    method: str
    f_input: float | None = None
    f_baseline: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def completeness(self) -> dict[str, float]:
        """``sum`` of attributions, ``delta = f(x) - f(baseline)``, absolute and relative gap (IG should be ~0)."""
        if self.f_input is None or self.f_baseline is None:
            raise MethodNotApplicableError(f"{self.method} has no completeness property (only integrated gradients)")
        total = float(self.values.double().sum())
        delta = self.f_input - self.f_baseline
        return {"sum": total, "delta": delta, "gap": total - delta, "relative_gap": abs(total - delta) / max(abs(delta), 1e-12)}


def _alphas(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        a = np.linspace(0, 1, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return a, w
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    raise ValueError(f"method must be riemann_middle, riemann_trapezoid or gausslegendre, got {method!r}")


def _embed_hook(model: nn.Module, target: str) -> str:
    two_tower = getattr(model, "text", None) is not None or (getattr(model, "blocks", None) is None and getattr(model, "vision", None) is not None)
    if two_tower:
        return "vision.hook_embed" if target == "visual_embeds" else "text.hook_embed"
    return "hook_embed"


def _embed_positions(model: nn.Module, inputs: Mapping[str, Any], target: str, hook: str) -> Tensor | None:
    """Positions of ``hook`` to interpolate (None = all of them): visual / text tokens from the layout."""
    if hook != "hook_embed":
        return None
    layout = _layout_or_none(model, inputs)
    if layout is None:
        raise MethodNotApplicableError("embedding attribution needs the model's token layout")
    if target == "visual_embeds":
        sel = layout.item[0] >= 0
    else:
        sel = layout.kind[0] == 0
    if not bool(sel.any()):
        raise MethodNotApplicableError(f"this input has no {target.split('_')[0]} positions to attribute")
    return sel.nonzero().flatten()


def _hook_value(model: nn.Module, inputs: Mapping[str, Any], hook: str) -> Tensor:
    store: dict[str, Tensor] = {}

    def keep(x, hook):
        store["x"] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[(hook, keep)])
    return store["x"]


def _scores(model: nn.Module, inputs: Mapping[str, Any], metric: Metric) -> Tensor:
    return metric(model(**inputs)).reshape(-1)


def integrated_gradients(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Metric,
    *,
    target: str = "pixels",
    baseline: str | Tensor = "black",
    steps: int = 32,
    batch_size: int = 8,
    method: str = "riemann_middle",
    pixel_key_name: str | None = None,
    sigma: float = 10.0,
) -> Attribution:
    """Integrated gradients of ``metric(model(**inputs))`` (one value per prompt) along a straight path.

    ``target``: ``pixels`` (``values`` shaped like the pixel tensor), ``visual_embeds`` / ``text_embeds``
    (``values [L, d]``, zero outside the attributed positions). ``method``: ``riemann_middle`` (default),
    ``riemann_trapezoid`` or ``gausslegendre`` (Captum's default). ``metric`` must return one value per batch
    row (for CLIP / SigLIP: :func:`clip_match`).
    """
    alphas, weights = _alphas(steps, method)
    with eval_mode(model):
        if target == "pixels":
            key = pixel_key(inputs, pixel_key_name, model)
            x = inputs[key].detach()
            b = pixel_baseline(model, inputs, baseline, key=key, sigma=sigma).detach()
            hook, pos = None, None
        elif target in ("visual_embeds", "text_embeds"):
            hook = _embed_hook(model, target)
            pos = _embed_positions(model, inputs, target, hook)
            full = _hook_value(model, inputs, hook)[:1]
            x = full if pos is None else full[:, pos]
            b = _embed_baseline(model, inputs, x, baseline, hook, pos, sigma)
            key = None
        else:
            raise ValueError(f"target must be 'pixels', 'visual_embeds' or 'text_embeds', got {target!r}")
        total = torch.zeros_like(x, dtype=torch.float64)
        for start in range(0, steps, batch_size):
            a = torch.as_tensor(alphas[start : start + batch_size], dtype=x.dtype)
            w = torch.as_tensor(weights[start : start + batch_size], dtype=torch.float64)
            k = len(a)
            path = (b[None] + a.reshape(-1, *[1] * x.ndim) * (x - b)[None]).detach().requires_grad_(True)  # k, *x
            tiled = tile_inputs(inputs, k, model)
            if key is not None:
                tiled[key] = path.reshape(k * x.shape[0], *x.shape[1:])
                vals = _scores(model, tiled, metric)
            else:
                vals = _run_with_embed(model, tiled, metric, hook, pos, path)
            if vals.shape[0] != k:
                raise ValueError(f"metric returned {vals.shape[0]} values for a batch of {k} copies; it must give one per row")
            (g,) = torch.autograd.grad(vals.sum(), path)
            total += (g.double() * w.reshape(-1, *[1] * x.ndim)).sum(0)
        attr = (total * (x - b).double()).to(torch.float32)
        with torch.no_grad():
            ends = tile_inputs(inputs, 2, model)
            if key is not None:
                ends[key] = torch.cat([x, b], 0)
                fx, fb = _scores(model, ends, metric).tolist()
            else:
                fx, fb = _run_with_embed(model, ends, metric, hook, pos, torch.stack([x, b])).tolist()
    values = attr
    if pos is not None:
        values = torch.zeros(full.shape[1:], dtype=attr.dtype)
        values[pos] = attr[0]
    elif key is None:
        values = attr[0]
    return Attribution(values, target, f"integrated_gradients/{method}/{steps}", fx, fb,
                       meta={"baseline": baseline if isinstance(baseline, str) else "tensor", "key": key or hook})


def _embed_baseline(model, inputs, x, baseline, hook, pos, sigma) -> Tensor:
    if isinstance(baseline, Tensor):
        if baseline.shape != x.shape:
            raise ValueError(f"baseline has shape {tuple(baseline.shape)}; the attributed embeddings have {tuple(x.shape)}")
        return baseline.to(x.dtype)
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=-2, keepdim=True).expand_as(x).clone()
    if baseline in ("black", "blur"):
        key = pixel_key(inputs, model=model)
        other = dict(inputs)
        other[key] = pixel_baseline(model, inputs, baseline, key=key, sigma=sigma)
        full = _hook_value(model, other, hook)[:1]
        return full if pos is None else full[:, pos]
    raise ValueError(f"unknown baseline {baseline!r}; use zero, mean, black, blur or a tensor")


def _run_with_embed(model, tiled, metric, hook, pos, path) -> Tensor:
    """Forward with ``hook``'s value replaced (at ``pos``) by the rows of ``path [k, 1, n, d]``."""

    def put(value, hook):
        v = value.clone()
        if pos is None:
            return path.reshape(value.shape).to(value.dtype)
        v[:, pos] = path[:, 0].to(value.dtype)
        return v

    return metric(model.run_with_hooks(**tiled, fwd_hooks=[(hook, put)])).reshape(-1)


# --------------------------------------------------------------------------------------------- saliency
def high_pass(map2d: Tensor, sigma: float = 3.0) -> Tensor:
    """A map minus its Gaussian blur, clipped at 0 (keeps sharp, local evidence; "MLLMs know where to look")."""
    low = _blur_frames(map2d, sigma)
    return (map2d - low).clamp(min=0)


def gradient_saliency(
    model: nn.Module,
    inputs: Mapping[str, Any],
    metric: Metric,
    *,
    times_input: bool = False,
    pixel_key_name: str | None = None,
) -> Attribution:
    """Gradient of the metric w.r.t. the pixel tensor (``times_input``: input x gradient), same shape as the pixels."""
    key = pixel_key(inputs, pixel_key_name, model)
    with eval_mode(model), torch.enable_grad():
        x = inputs[key].detach().clone().requires_grad_(True)
        run = dict(inputs)
        run[key] = x
        val = _scores(model, run, metric).sum()
        (g,) = torch.autograd.grad(val, x)
    values = g * x.detach() if times_input else g
    return Attribution(values.detach(), "pixels", "input_x_gradient" if times_input else "gradient", meta={"key": key})


def pixel_map(model: nn.Module, inputs: Mapping[str, Any], attr: Attribution, image: int | None = 0,
              video: int | None = None, absolute: bool = True, sigma_high_pass: float | None = None,
              part: int | None = None) -> Tensor:
    """A pixel attribution as an image map ``[frames, H, W]`` (channel sum; ``absolute``: of |values| first).

    Qwen's packed rows are unpacked through the layout; 4-D ``[N, C, H, W]`` tensors give image ``image``;
    LLaVA-NeXT / OneVision 5-D any-res crops give the high-resolution crops stitched into the image (padding cut,
    :func:`anyres_canvas`), or the base crop with ``part=BASE``. ``sigma_high_pass`` applies :func:`high_pass` per
    frame.
    """
    v = attr.values.abs() if absolute else attr.values
    if _is_packed(v):
        layout = _layout_or_none(model, inputs)
        _, it = layout.find_item(image if video is None else None, video)
        frames = unpack_qwen_pixels(v, it)
    elif v.ndim == 5:
        frames = anyres_canvas(_layout_or_none(model, inputs), v, image or 0, part)
    elif v.ndim == 4:
        frames = v[(image or 0) : (image or 0) + 1]
    else:
        raise MethodNotApplicableError(f"no image view for a pixel tensor of shape {tuple(v.shape)}")
    m = frames.sum(1)
    if sigma_high_pass is not None:
        m = torch.stack([high_pass(f, sigma_high_pass) for f in m])
    return m


def anyres_canvas(layout: Any, x: Float[Tensor, "n crops c s s"], image: int = 0, part: int | None = None) -> Float[Tensor, "1 c h w"]:
    """An any-res image's pixels (or pixel attributions) as one image: its high-resolution crops pasted side by side
    in raster order, cut to the unpadded box the LM's grid tokens cover (``item.unpad``), or its base crop
    (``part=BASE``, or an image without crops)."""
    if layout is None or getattr(layout, "part", None) is None:
        raise MethodNotApplicableError("5-D any-res pixel tensors need the LLaVA-NeXT / OneVision token layout")
    px = x[image]
    n_crops = layout.n_crops(image)
    if part == BASE or n_crops == 0:
        return px[:1]
    crops = px[1 : 1 + n_crops].permute(0, 2, 3, 1)  # [crops, s, s, c]
    return layout.stitch_crops(crops, image, in_pixels=True).permute(2, 0, 1)[None]


def attribution_grid(model: nn.Module, inputs: Mapping[str, Any], attr: Attribution, image: int | None = None,
                     video: int | None = None, absolute: bool = True, part: int | None = None) -> Tensor:
    """Reduce an attribution to the item's token grid ``[frames, rows, cols]`` (the grid of attention maps).

    Embedding attributions: sum over the model dimension per position, placed by the layout. Pixel attributions:
    Qwen rows are summed per merged token (through the layout); 4-D pixel tensors are channel-summed and
    mass-pooled onto the grid; 5-D any-res crops are stitched (:func:`anyres_canvas`) and mass-pooled onto the
    any-res token grid (``part=BASE``: the base crop onto the base grid).
    """
    layout = _layout_or_none(model, inputs)
    if layout is None:
        raise MethodNotApplicableError("grid views need a token layout; for CLIP / SigLIP use pixel_map / grad_eclip grids")
    v = attr.values.abs() if absolute else attr.values
    if attr.target != "pixels":
        per_pos = v.sum(-1)[None, None, None]  # 1 1 1 L  (B = 1)
        return grid_view(per_pos, layout, image=image, video=video, part=part)[0, 0]
    if _is_packed(v):
        from analyses.positions import pixel_rows

        _, it = layout.find_item(image, video)
        item_id = layout.items.index(it)
        pos = (layout.item[it.batch] == item_id).nonzero().flatten()
        per_pos = torch.zeros(layout.batch_size, 1, 1, layout.seq_len)
        for p in pos.tolist():
            _, rows = pixel_rows(layout, [p], batch=it.batch)
            per_pos[it.batch, 0, 0, p] = v[rows].sum()
        return grid_view(per_pos, layout, image=image, video=video, part=part)[0, 0]
    img = pixel_map(model, inputs, attr, image=image or 0, absolute=absolute, part=part)
    ones = torch.ones(layout.batch_size, 1, 1, layout.seq_len)
    shape = grid_view(ones, layout, image=image, video=video, part=part).shape[-2:]
    return pool_grid(img, tuple(shape), mode="mass")


# --------------------------------------------------------------------------------------------- Grad-CAM
def _vision_hooks(model: nn.Module) -> list[str]:
    blocks = getattr(getattr(model, "vision", None), "blocks", None)
    if blocks is None:
        raise MethodNotApplicableError(f"{type(model).__name__} has no vision tower with blocks: Grad-CAM does not apply")
    return [f"vision.blocks.{i}.hook_resid_post" for i in range(len(blocks))]


@dataclass
class TokenCAMs:
    """Grad-CAM maps of one image or video, one per answer token: ``maps [n_tokens, frames, rows, cols]`` on the
    item's vision-tower patch grid (video: one map per frame or temporal slice; any-res: the crops stitched)."""

    maps: Float[Tensor, "n t rows cols"]
    tokens: list[int]
    positions: list[int]
    hook: str


def grad_cam(
    model: nn.Module,
    inputs: Mapping[str, Any],
    answer_positions: Sequence[int],
    *,
    layer: int | None = None,
    image: int | None = 0,
    video: int | None = None,
    part: int | None = None,
) -> TokenCAMs:
    """Per-token Grad-CAM on vision-tower tokens for a generative VLM, for an image or a video.

    ``inputs`` hold prompt + answer (e.g. the output of ``model.generate`` as ``input_ids``); for the answer token
    at position ``p`` the target is ``log p(token_p | prefix)`` read at ``p - 1``. With the item's patch
    activations ``A`` (``vision.blocks.{layer}.hook_resid_post``, [CLS] dropped) laid out as ``[frames, rows,
    cols, d]`` and their gradients ``G``, ``CAM = ReLU(A @ mean G)``, the mean over every cell of that view (so a
    video's frames share one set of channel weights, as in spatio-temporal Grad-CAM). Views: Qwen images and
    videos -> the patch grid ``grid_thw`` (video: one map per temporal slice); LLaVA-NeXT / OneVision video ->
    one ``side x side`` map per frame; LLaVA-NeXT / OneVision any-res images -> the high-resolution crops stitched
    into the image (padding cut off; ``part=BASE`` for the base crop instead); LLaVA 1.5 / Gemma 3 -> the patch
    grid. ``layer=None``: the deepest block whose output reaches the language model (LLaVA reads
    ``vision_feature_layer=-2``, so its last block never does). All answer tokens go in one batched backward.
    """
    hooks = _vision_hooks(model)
    if layer is not None:
        i = layer + len(hooks) if layer < 0 else layer
        if not 0 <= i < len(hooks):
            raise ValueError(f"vision layer {layer} does not exist (the tower has {len(hooks)} blocks)")
        hooks = [hooks[i]]
    if video is not None:
        image = None
    layout = _layout_or_none(model, inputs)
    if layout is None:
        raise MethodNotApplicableError("Grad-CAM places vision tokens through the model's token layout; this model has none")
    layout.find_item(image, video)  # a clear error for an item that does not exist
    ids = inputs["input_ids"]
    pos = [p % ids.shape[1] for p in answer_positions]
    if any(p == 0 for p in pos):
        raise ValueError("answer position 0 has no prefix to predict it from")
    tokens = [int(ids[0, p]) for p in pos]
    k = len(pos)
    tiled = tile_inputs(inputs, k, model)
    store: dict[str, Tensor] = {}

    def keep(x, hook):
        x.retain_grad()
        store[hook.name] = x
        return x

    with eval_mode(model), torch.enable_grad():
        logits = model.run_with_hooks(**tiled, fwd_hooks=[(h, keep) for h in hooks])
        lp = torch.log_softmax(logits.float(), -1)
        value = sum(lp[r, p - 1, t] for r, (p, t) in enumerate(zip(pos, tokens)))
        value.backward()
    reached = [h for h in hooks if store[h].grad is not None]
    if not reached:
        raise MethodNotApplicableError(
            f"{hooks[0]} does not reach the output (the model reads vision features from an earlier layer, e.g. "
            "LLaVA's vision_feature_layer=-2); pass layer=None or a lower layer"
        )
    hook = reached[-1]
    a, g = store[hook].detach(), store[hook].grad.detach()
    per_copy = a.shape[0] // k
    maps = []
    for r in range(k):
        sl = slice(r * per_copy, (r + 1) * per_copy)
        ar = item_patch_grid(layout, a[sl], image, video, part)
        gr = item_patch_grid(layout, g[sl], image, video, part)
        cam = (ar.reshape(-1, ar.shape[-1]) @ gr.reshape(-1, gr.shape[-1]).mean(0)).clamp(min=0)
        maps.append(cam.reshape(ar.shape[:-1]))
    return TokenCAMs(torch.stack(maps), tokens, pos, hook)


# --------------------------------------------------------------------------------------------- Grad-ECLIP
@dataclass
class EclipMap:
    """Grad-ECLIP map(s): ``image [rows, cols]`` over patches and/or ``text [L]`` over text positions, plus the score."""

    score: float
    image: Tensor | None = None
    text: Tensor | None = None
    meta: dict = field(default_factory=dict)


def clip_match(out: Any) -> Tensor:
    """Per-row matching score of a two-tower output for tiled inputs: the cosine of image i with text i."""
    return (out.image_embeds * out.text_embeds).sum(-1)


def grad_eclip(
    model: nn.Module,
    pixels: Float[Tensor, "1 c h w"],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    towers: Sequence[str] = ("image", "text"),
) -> EclipMap:
    """Grad-ECLIP for a CLIP / SigLIP pair: which patches (and text tokens) make the image-text match.

    Score ``S = cos(image_embed, text_embed)``. For the pooled token (CLIP ``[CLS]`` / the SigLIP MAP probe / the
    text's pooled position) in the tower's last attention: channel weights ``w = dS / dz_pool`` (the gradient on
    its attention output ``hook_z``), spatial weights ``lambda_j = minmax_j cos(q_pool, k_j)`` (heads
    concatenated), and ``map_j = ReLU(sum_c w_c v_jc lambda_j)`` with ``v`` the values. Native resolution: one
    value per patch of the input as given (``interpolate_pos_encoding`` when the size differs).
    """
    if getattr(model, "text", None) is None or getattr(model, "vision", None) is None or not hasattr(model, "similarity"):
        raise MethodNotApplicableError("Grad-ECLIP explains an image-text match: it needs a two-tower CLIP / SigLIP model")
    spec = model.vision.spec
    siglip = model.vision.head is not None
    vprefix = "vision.head.attn" if siglip else f"vision.blocks.{spec.depth - 1}.attn"
    tprefix = f"text.blocks.{model.text.depth - 1}.attn"
    names = [f"{p}.{h}" for p in (vprefix, tprefix) for h in ("hook_q", "hook_k", "hook_v", "hook_z")]
    store: dict[str, Tensor] = {}

    def keep(x, hook):
        if hook.name.endswith("hook_z"):
            x.retain_grad()
        store[hook.name] = x
        return x

    size = pixels.shape[-2:]
    interp = tuple(size) != (spec.image_size, spec.image_size)
    pixel_input = model.input_schema().pixel_input("image")
    with eval_mode(model), torch.enable_grad():
        out = model.run_with_hooks(input_ids=input_ids, attention_mask=attention_mask, interpolate_pos_encoding=interp,
                                   fwd_hooks=[(n, keep) for n in names], **{pixel_input: pixels})
        score = (out.image_embeds[0] * out.text_embeds[0]).sum()
        score.backward()
    res = EclipMap(float(score.detach()))
    if "image" in towers:
        pool = 0
        q, k, v, z = (store[f"{vprefix}.{h}"] for h in ("hook_q", "hook_k", "hook_v", "hook_z"))
        first = 1 if spec.has_cls else 0
        emap = eclip_map(q[0, pool], k[0, first:], v[0, first:], z.grad[0, pool])
        gh, gw = size[0] // spec.patch_size, size[1] // spec.patch_size
        res.image = emap.reshape(gh, gw)
    if "text" in towers:
        p = int(model.text.pool_positions(input_ids)[0])
        q, k, v, z = (store[f"{tprefix}.{h}"] for h in ("hook_q", "hook_k", "hook_v", "hook_z"))
        last = p + 1 if model.text.spec.causal else k.shape[1]
        res.text = eclip_map(q[0, p], k[0, :last], v[0, :last], z.grad[0, p])
        res.meta["pool_position"] = p
    return res


def eclip_map(q_pool: Tensor, k: Tensor, v: Tensor, grad_pool: Tensor) -> Tensor:
    """Grad-ECLIP's map from one pooled query (public: the CIR pipeline applies it to its own targets):
    ``ReLU(sum_c w_c v_jc lambda_j)`` with ``lambda = minmax cos(q_pool, k_j)``; heads concatenated."""
    qf = q_pool.detach().reshape(-1)
    kf = k.detach().reshape(k.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(kf, qf[None], dim=-1)
    lam = (cos - cos.min()) / (cos.max() - cos.min()).clamp_min(1e-12)
    w = grad_pool.detach().reshape(-1)
    vf = v.detach().reshape(v.shape[0], -1)
    return ((vf * w[None]).sum(-1) * lam).clamp(min=0)
