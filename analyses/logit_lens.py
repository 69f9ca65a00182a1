"""Logit lens at every layer and position, visual tokens included; patch-level zero-shot lens for CLIP / SigLIP.

Decoder VLMs (:func:`logit_lens`): the residual stream entering block ``l`` (``l = 0``: the embeddings
with visual features injected; ``l = n_layers``: the output of the last block) is read through the
unembedding, either after the model's final norm (``norm="final"``, the usual logit lens: at
``l = n_layers`` it *is* the model's output) or straight (``norm="none"``, the raw residual projected
onto the unembedding). Per position it keeps the top-k tokens and the probability of chosen answer
tokens, never the full ``[layers, positions, vocab]`` tensor. Views: per grid cell ``[layer, rows,
cols]`` (:meth:`LensResult.cell_view`), per video frame ``[layer, frames]`` (:meth:`LensResult.frame_view`),
a tidy table, PNG small multiples (:func:`plot_cell_view`) and the HTML page of :mod:`analyses.lens_html`.

Two-tower models (:func:`clip_patch_lens`, :func:`clip_text_lens`): each vision token's state at
layer ``l`` goes through the tower's final norm and the visual projection (CLIP) or through the final
norm and the attention-pooling head applied to that token alone (SigLIP: with one key the pooling
attention weight is 1), then is scored against the text embeddings of given labels exactly as the
model scores images (``exp(logit_scale) * cos`` (+ bias)). Text tokens likewise through the text
tower's final norm and projection / head, against image embeddings. At the last layer the ``[CLS]``
token (CLIP) and the pooled text token reproduce the model's ``logits_per_image`` / ``logits_per_text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "LensResult", "logit_lens", "lens_logits", "lens_hook_names", "plot_cell_view", "plot_frame_view",
    "ClipLensResult", "clip_patch_lens", "clip_text_lens",
]

Norm = Literal["final", "none"]


def lens_hook_names(n_layers: int, prefix: str = "") -> list[str]:
    """Hook names of lens layers ``0..n_layers``: ``resid_pre`` of each block, then the last ``resid_post``."""
    return [f"{prefix}blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [f"{prefix}blocks.{n_layers - 1}.hook_resid_post"]


def lens_logits(model: Any, resid: Float[Tensor, "... d_model"], norm: Norm = "final") -> Float[Tensor, "... vocab"]:
    """Unembed a residual state, after the model's final norm (``"final"``) or without it (``"none"``)."""
    if norm not in ("final", "none"):
        raise ValueError(f"norm must be 'final' (the logit lens) or 'none' (raw unembedding), got {norm!r}")
    x = model.ln_final(resid) if norm == "final" else resid
    return model.unembed(x)


@dataclass
class LensResult:
    """Logit-lens readout of one prompt.

    Attributes:
        top_ids / top_probs: ``[layer, pos, k]`` top-k tokens and their probabilities per lens layer.
        answer_probs: ``[layer, pos, answers]`` probability of each ``answer_ids`` token (empty last axis if none).
        answer_ids: the answer token ids.
        layers: lens layer indices (``l`` = residual entering block ``l``; ``n_layers`` = final output).
        positions: the sequence positions read (row order of the ``pos`` axis).
        norm: ``"final"`` (logit lens) or ``"none"`` (raw unembedding).
        layout: the prompt batch's token layout; ``batch``: the prompt row read.
    """

    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    answer_probs: Float[Tensor, "layer pos answers"]
    answer_ids: list[int]
    layers: list[int]
    positions: list[int]
    norm: str
    layout: Any
    batch: int = 0

    def _pos_index(self) -> dict[int, int]:
        return {p: i for i, p in enumerate(self.positions)}

    def frame(self, tokenizer: Any = None) -> pd.DataFrame:
        """Tidy table: one row per (layer, position, rank) with token id (and text), probability and the
        position's kind, item, frame, row and col from the layout."""
        L, P, K = self.top_ids.shape
        lay, b = self.layout, self.batch
        pos = torch.tensor(self.positions)
        per_pos = {c: getattr(lay, c)[b, pos].numpy() for c in ("kind", "item", "frame", "row", "col")}
        out = pd.DataFrame({
            "norm": self.norm,
            "layer": np.repeat(np.asarray(self.layers), P * K),
            "position": np.tile(np.repeat(pos.numpy(), K), L),
            "rank": np.tile(np.arange(K), L * P),
            "token_id": self.top_ids.reshape(-1).numpy(),
            "prob": self.top_probs.reshape(-1).float().numpy(),
        })
        for c, v in per_pos.items():
            out[c] = np.tile(np.repeat(v, K), L)
        if tokenizer is not None:
            vocab = {i: tokenizer.decode([i]) for i in np.unique(out["token_id"])}
            out["token"] = out["token_id"].map(vocab)
        return out

    def answer_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (layer, position, answer) with its probability."""
        L, P, A = self.answer_probs.shape
        return pd.DataFrame({
            "norm": self.norm,
            "layer": np.repeat(np.asarray(self.layers), P * A),
            "position": np.tile(np.repeat(np.asarray(self.positions), A), L),
            "answer_id": np.tile(np.asarray(self.answer_ids, dtype=int), L * P),
            "prob": self.answer_probs.reshape(-1).float().numpy(),
        })

    def _cells(self, image: int | None, video: int | None, frame: int, part: str = "auto") -> tuple[list[tuple[int, int, int]], int, int]:
        """(lens row, grid row, grid col) of every visual token of the item/frame, and the grid shape.

        LLaVA-NeXT / OneVision images hold a base grid and a high-resolution crop grid with their own
        row/col numbering: ``part="base"`` or ``"crops"`` picks one (``"auto"``: the crops when present)."""
        lay, b = self.layout, self.batch
        item_id, it = lay.find_item(image, video)
        if it.batch != b:
            raise ValueError(f"{it.kind} {it.index} belongs to prompt {it.batch}, this lens read prompt {b}")
        idx = self._pos_index()
        sel_t = (lay.item[b] == item_id) & (lay.row[b] >= 0) & (lay.col[b] >= 0)
        if it.kind == "video":
            sel_t = sel_t & (lay.frame[b] == frame)
        elif frame != 0:
            raise IndexError(f"images have one frame; got frame={frame}")
        base = int(getattr(it, "base_tokens", 0) or 0)
        total = int(getattr(it, "total_tokens", 0) or 0)
        if it.kind == "image" and 0 < base < total:
            if part not in ("auto", "base", "crops"):
                raise ValueError(f"part must be 'auto', 'base' or 'crops', got {part!r}")
            in_base = torch.zeros_like(sel_t)
            in_base[it.start : it.start + base] = True
            sel_t = sel_t & (in_base if part == "base" else ~in_base)
        sel = sel_t.nonzero().flatten().tolist()
        if not sel:
            raise IndexError(f"{it.kind} {it.index} has no grid tokens" + (f" in frame {frame}" if it.kind == "video" else ""))
        missing = [p for p in sel if p not in idx]
        if missing:
            raise ValueError(f"positions {missing[:5]} of {it.kind} {it.index} were not read; run logit_lens with positions=None")
        cells = [(idx[p], int(lay.row[b, p]), int(lay.col[b, p])) for p in sel]
        return cells, max(r for _, r, _ in cells) + 1, max(c for _, _, c in cells) + 1

    def cell_view(
        self, image: int | None = None, video: int | None = None, frame: int = 0, answer: int = 0,
        what: Literal["answer_prob", "top1_prob"] = "answer_prob", part: Literal["auto", "base", "crops"] = "auto",
    ) -> Float[np.ndarray, "layer rows cols"]:
        """``[layer, rows, cols]`` map of one image (or one frame of a video) from the token layout: the
        probability of answer ``answer`` (index into ``answer_ids``) or of each cell's top-1 token. Tokens
        sharing a cell are averaged; ``part`` picks the base or crop grid of LLaVA-NeXT-style images."""
        cells, h, w = self._cells(image, video, frame, part)
        if what == "answer_prob":
            if not self.answer_ids:
                raise ValueError("no answer_ids were given to logit_lens; pass answer_ids=[...] or use what='top1_prob'")
            src = self.answer_probs[..., answer]
        elif what == "top1_prob":
            src = self.top_probs[..., 0]
        else:
            raise ValueError(f"what must be 'answer_prob' or 'top1_prob', got {what!r}")
        out = np.zeros((len(self.layers), h, w))
        count = np.zeros((h, w))
        for i, r, c in cells:
            out[:, r, c] += src[:, i].float().numpy()
            count[r, c] += 1
        with np.errstate(invalid="ignore"):
            return out / np.where(count > 0, count, np.nan)

    def top_token_grid(self, image: int | None = None, video: int | None = None, frame: int = 0,
                       part: Literal["auto", "base", "crops"] = "auto") -> Int[np.ndarray, "layer rows cols"]:
        """``[layer, rows, cols]`` top-1 token id per cell (-1 where no token); first token wins on shared cells."""
        cells, h, w = self._cells(image, video, frame, part)
        out = np.full((len(self.layers), h, w), -1, dtype=np.int64)
        for i, r, c in reversed(cells):
            out[:, r, c] = self.top_ids[:, i, 0].numpy()
        return out

    def frame_view(self, video: int = 0, answer: int = 0) -> Float[np.ndarray, "layer frames"]:
        """``[layer, frames]`` mean probability of answer ``answer`` over each temporal slice's tokens."""
        _, it = self.layout.find_item(video=video)
        n_frames = it.merged_grid[0]
        return np.stack([np.nanmean(self.cell_view(video=video, frame=f, answer=answer), axis=(1, 2)) for f in range(n_frames)], axis=1)


@torch.no_grad()
def logit_lens(
    model: Any, inputs: dict[str, Any], answer_ids: Sequence[int] = (), layers: Sequence[int] | None = None,
    positions: Sequence[int] | Tensor | None = None, norm: Norm = "final", top_k: int = 5, batch: int = 0,
    chunk: int = 256,
) -> LensResult:
    """Read every lens layer at ``positions`` (default: all non-padding positions) of prompt ``batch``.

    One forward with a cache of the residual stream; positions are unembedded in chunks of ``chunk`` so
    memory stays at ``chunk x vocab`` per layer. Probabilities are a float32 softmax over the vocabulary.
    """
    n = model.cfg.n_layers
    names = lens_hook_names(n)
    layers = list(range(n + 1)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l <= n]
    if bad:
        raise ValueError(f"lens layers {bad} out of range: 0 (embeddings) .. {n} (output of the last block)")
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    lay = model.layout(**inputs)
    if positions is None:
        valid = lay.attention_mask[batch].bool() if lay.attention_mask is not None else torch.ones(lay.seq_len, dtype=torch.bool)
        pos = valid.nonzero().flatten()
    else:
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1) % lay.seq_len
    wanted = {names[l] for l in layers}
    _, cache = model.run_with_cache(**inputs, names_filter=lambda name: name in wanted)
    answers = torch.as_tensor(list(answer_ids), dtype=torch.long)
    tops, probs_k, ans = [], [], []
    for l in layers:
        resid = cache[names[l]][batch, pos.to(cache[names[l]].device)]
        t_ids, t_p, a_p = [], [], []
        for s in range(0, resid.shape[0], chunk):
            p = torch.softmax(lens_logits(model, resid[s : s + chunk], norm).float(), dim=-1)
            v, i = p.topk(min(top_k, p.shape[-1]), dim=-1)
            t_ids.append(i.cpu())
            t_p.append(v.cpu())
            a_p.append(p[:, answers.to(p.device)].cpu())
        tops.append(torch.cat(t_ids))
        probs_k.append(torch.cat(t_p))
        ans.append(torch.cat(a_p))
    return LensResult(torch.stack(tops), torch.stack(probs_k), torch.stack(ans), answers.tolist(), layers, pos.tolist(), norm, lay, batch)


def plot_cell_view(
    view: Float[np.ndarray, "layer rows cols"], path: str | Path, layers: Sequence[int] | None = None,
    title: str = "", image: np.ndarray | None = None, vmax: float | None = None,
) -> Path:
    """PNG small multiples, one panel per lens layer (over the image when given), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = view.shape[0]
    layers = list(range(L)) if layers is None else list(layers)
    cols = min(L, 6)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows + 0.4), squeeze=False)
    vmax = float(np.nanmax(view)) if vmax is None else vmax
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= L:
            continue
        h, w = view.shape[1:]
        if image is not None:
            ax.imshow(image, extent=(0, w, h, 0))
        im = ax.imshow(view[k], cmap="magma", vmin=0, vmax=vmax, alpha=0.6 if image is not None else 1.0, extent=(0, w, h, 0))
        ax.set_title(f"layer {layers[k]}", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_frame_view(view: Float[np.ndarray, "layer frames"], path: str | Path, layers: Sequence[int] | None = None,
                    title: str = "") -> Path:
    """PNG heatmap of a :meth:`LensResult.frame_view` (lens layer x video frame), matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(view.shape[0])) if layers is None else list(layers)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * view.shape[1], 1.0 + 0.3 * view.shape[0]))
    im = ax.imshow(view, aspect="auto", origin="lower", cmap="magma")
    ax.set_xlabel("frame (temporal slice)")
    ax.set_ylabel("lens layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLIP / SigLIP
@dataclass
class ClipLensResult:
    """Zero-shot lens scores of a two-tower model.

    ``logits``: ``[layer, items, tokens, targets]`` similarity logits (model scale and bias applied);
    ``probs``: softmax over targets (CLIP) or sigmoid (SigLIP). ``grid``: ``(rows, cols)`` of the patch
    tokens (vision lens) or None (text lens); ``has_cls``: whether token 0 is CLIP's ``[CLS]``.
    """

    logits: Float[Tensor, "layer items tokens targets"]
    probs: Float[Tensor, "layer items tokens targets"]
    layers: list[int]
    grid: tuple[int, int] | None
    has_cls: bool
    family: str

    def patch_view(self, item: int = 0, target: int = 0) -> Float[np.ndarray, "layer rows cols"]:
        """``[layer, rows, cols]`` probability of ``target`` per patch (vision lens only)."""
        if self.grid is None:
            raise ValueError("a text lens has no patch grid")
        start = int(self.has_cls)
        return self.probs[:, item, start:, target].reshape(len(self.layers), *self.grid).numpy()

    def frame(self) -> pd.DataFrame:
        """Tidy table: one row per (layer, item, token, target) with logit and probability."""
        L, B, N, T = self.logits.shape
        idx = np.stack(np.meshgrid(np.asarray(self.layers), np.arange(B), np.arange(N), np.arange(T), indexing="ij"), -1).reshape(-1, 4)
        return pd.DataFrame({"layer": idx[:, 0], "item": idx[:, 1], "token": idx[:, 2], "target": idx[:, 3],
                             "logit": self.logits.reshape(-1).numpy(), "prob": self.probs.reshape(-1).numpy()})


def _scores(model: Any, queries: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, probs)`` of query embeddings ``[Q, P]`` against target embeddings ``[T, P]``: ``[Q, T]``."""
    logits = model.similarity(targets, queries) if model.logit_scale is not None else _cos(queries, targets)  # [Q, T]
    probs = torch.sigmoid(logits) if model.cfg.family == "siglip" else torch.softmax(logits, dim=-1)
    return logits, probs


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def _vision_token_embeds(model: Any, states: Float[Tensor, "b n d"]) -> Float[Tensor, "b n p"]:
    v = model.vision
    x = v.ln_post(states)
    if model.cfg.family == "siglip":
        if v.head is None:
            raise ValueError("this SigLIP tower has no pooling head (vision_use_head=False): there is no image embedding space")
        b, n, d = x.shape
        return v.head(x.reshape(b * n, 1, d)).reshape(b, n, -1)  # one key: pooling weight 1 on the token itself
    return model.visual_projection(x)


def _text_token_embeds(model: Any, states: Float[Tensor, "b n d"]) -> Float[Tensor, "b n p"]:
    t = model.text
    x = t.ln_final(states)
    if getattr(t, "head", None) is not None:
        x = t.head(x)
    if model.text_projection is not None:
        x = model.text_projection(x)
    return x


def _check_two_tower(model: Any, tower: str) -> None:
    if getattr(model, tower, None) is None or not hasattr(model, "similarity"):
        raise TypeError(f"this lens needs a hooked CLIP / SigLIP two-tower model with a {tower} tower "
                        "(hooked_vlm.families.clip.HookedCLIP); for decoder VLMs use logit_lens")


@torch.no_grad()
def clip_patch_lens(
    model: Any, pixel_values: Float[Tensor, "images 3 H W"], label_input_ids: Int[Tensor, "labels pos"],
    label_attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
) -> ClipLensResult:
    """Patch-level zero-shot labels: every vision token at every layer scored against the label texts."""
    _check_two_tower(model, "vision")
    _check_two_tower(model, "text")
    text_emb = model.encode_text(label_input_ids, label_attention_mask)
    depth = model.vision.depth
    names = lens_hook_names(depth, "vision.")
    layers = list(range(depth + 1)) if layers is None else [int(l) for l in layers]
    _, cache = model.run_with_cache(pixel_values=pixel_values, names_filter=lambda n: n in {names[l] for l in layers})
    logits, probs = [], []
    for l in layers:
        emb = _vision_token_embeds(model, cache[names[l]])
        b, n, p = emb.shape
        lg, pr = _scores(model, emb.reshape(b * n, p), text_emb)
        logits.append(lg.reshape(b, n, -1))
        probs.append(pr.reshape(b, n, -1))
    has_cls = model.cfg.family == "clip"
    ps = model.vision.spec.patch_size
    grid = (pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps)
    return ClipLensResult(torch.stack(logits).cpu(), torch.stack(probs).cpu(), layers, grid, has_cls, model.cfg.family)


@torch.no_grad()
def clip_text_lens(
    model: Any, input_ids: Int[Tensor, "texts pos"], pixel_values: Float[Tensor, "images 3 H W"],
    attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
) -> ClipLensResult:
    """Every text token at every layer (through the text tower's final norm and projection / head) scored
    against the images' embeddings: ``[layer, texts, pos, images]``."""
    _check_two_tower(model, "text")
    _check_two_tower(model, "vision")
    img_emb = model.encode_image(pixel_values)
    depth = model.text.depth
    names = lens_hook_names(depth, "text.")
    layers = list(range(depth + 1)) if layers is None else [int(l) for l in layers]
    _, cache = model.run_with_cache(input_ids=input_ids, attention_mask=attention_mask,
                                    names_filter=lambda n: n in {names[l] for l in layers})
    logits, probs = [], []
    for l in layers:
        emb = _text_token_embeds(model, cache[names[l]])
        b, n, p = emb.shape
        lg, pr = _scores(model, emb.reshape(b * n, p), img_emb)
        logits.append(lg.reshape(b, n, -1))
        probs.append(pr.reshape(b, n, -1))
    return ClipLensResult(torch.stack(logits).cpu(), torch.stack(probs).cpu(), layers, None, False, model.cfg.family)
