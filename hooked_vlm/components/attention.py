"""Multi-head / grouped-query attention with TransformerLens hook points; :func:`attention_path` picks the path.

* Fast path (default): PyTorch SDPA, never materialising the L x L matrix. Block-diagonal masks (Qwen
  vision images, frames and windows) run as batched per-segment SDPA calls.
* Pattern path: taken only when a hook (or the cache) is attached to ``hook_attn_scores`` or
  ``hook_pattern``, or when ``force_pattern`` is set. Scores and pattern are materialised, hooked, and
  the hooked values are the ones used, so edits take effect.
* Statistics path: taken when an :class:`AttnStatsRequest` is attached for the run (the request, its context
  and the knockout context live in :mod:`hooked_vlm.components.attn_stats`). The ``kernels`` package computes
  the output together with the requested statistics without the L x L matrix and fires ``hook_lse [B, H, Lq]``,
  ``hook_region [B, H, QG, KG]``, ``hook_row_mass [B, H, Lq, KG]``, ``hook_colsum [B, H, QG, Lk]`` and
  ``hook_rows [B, H, S, Lk]``. A knockout (``model.knockout(...)``) is added to the layer's MaskSpec, so the
  output, every statistic and (if cached) the pattern all see the same edit.

Every mask is a :class:`kernels.mask.MaskSpec`, the same object the attention-statistics kernels use.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vlm.components.attn_stats import (  # noqa: F401  (re-exported: their historical home)
    STAT_HOOKS,
    AttnRun,
    AttnStatsRequest,
    attn_stats_request,
    knockout,
    with_knockout,
)
from hooked_vlm.components.masked_attention import masked_attention  # issue 17
from hooked_vlm.components.norms import RMSNorm
from hooked_vlm.components.rotary import apply_rotary
from kernels.mask import MaskSpec

#: The ways one attention call can run (see :func:`attention_path`).
PATTERN, STATS, STATS_BESIDE_FAST, FAST = "pattern", "stats", "stats-beside-fast", "fast"


def attention_path(wants_pattern: bool, stats: "AttnStatsRequest | None", needs_grad: bool) -> str:
    """Which path computes one attention call: the one backend dispatch.

    * ``PATTERN``: a hook or the cache listens to the scores / pattern: materialise them (statistics, if
      requested, are computed beside it under no_grad);
    * ``STATS``: statistics requested: the ``kernels`` package computes output and statistics together;
    * ``STATS_BESIDE_FAST``: statistics requested while autograd tracks q / k / v: statistics under no_grad,
      the output from the fast path (keeps its graph);
    * ``FAST``: SDPA (or per-segment SDPA), never L x L.

    The MaskSpec (knockout included) reaches every path unchanged.
    """
    if wants_pattern:
        return PATTERN
    if stats is None:
        return FAST
    return STATS_BESIDE_FAST if needs_grad else STATS


@dataclass
class KVCache:
    """Post-rotary keys and values per layer, batch-first ``[B, L, Hkv, dh]``, for greedy decoding."""

    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def seq_len(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0


class SegmentPlans(weakref.WeakKeyDictionary):
    """A model's cache of block-diagonal segment plans, one per live mask object; pickles / copies as empty."""

    def __reduce__(self):
        return (SegmentPlans, ())

    def __deepcopy__(self, memo):
        return SegmentPlans()


def segment_plan(mask: MaskSpec, plans: SegmentPlans | None = None) -> list[Tensor]:
    """Flat indices ``b * L + i`` of each block-diagonal segment, grouped into ``[S, n]`` tensors of equal length.

    ``plans``: a model's cache (see :func:`share_segment_plans`), so a plan is computed once per mask object and
    shared by every layer of that model that uses it; None computes it uncached.
    """
    plan = None if plans is None else plans.get(mask)
    if plan is not None:
        return plan
    doc = mask.doc_ids
    assert doc is not None
    b, length = doc.shape
    flat = doc + (torch.arange(b, device=doc.device)[:, None] * (int(doc.max().item()) + 2))
    flat = flat.reshape(-1)
    order = torch.argsort(flat, stable=True)
    _, counts = torch.unique_consecutive(flat[order], return_counts=True)
    segments = torch.split(order, counts.tolist())
    by_len: dict[int, list[Tensor]] = {}
    for seg in segments:
        by_len.setdefault(seg.numel(), []).append(seg)
    plan = [torch.stack(group) for group in by_len.values()]
    if plans is not None:
        plans[mask] = plan
    return plan


def share_segment_plans(model: nn.Module) -> None:
    """Give every :class:`Attention` of ``model`` one segment-plan cache (per-model state, dropped with each mask)."""
    plans = SegmentPlans()
    for module in model.modules():
        if isinstance(module, Attention):
            module.segment_plans = plans


class Attention(nn.Module):
    """Attention with q/k/v/o projections, optional QK-norm, rotary, GQA and hook points.

    Hooks: ``hook_q`` / ``hook_k`` / ``hook_v`` ``[B, L, H(kv), dh]`` (before rotary), ``hook_rot_q`` /
    ``hook_rot_k`` (after), ``hook_attn_scores`` / ``hook_pattern`` ``[B, H, Lq, Lk]`` (only when asked for),
    ``hook_z`` ``[B, L, H, dh]``, and opt-in ``hook_result`` ``[B, L, H, d_model]`` (``use_attn_result``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        d_head: int,
        qkv_bias: bool,
        o_bias: bool,
        scale: float | None = None,
        qk_norm_eps: float | None = None,
        qk_norm_offset: float = 0.0,
        rotary_in_fp32: bool = False,
        layer_index: int = 0,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.scale = scale if scale is not None else d_head**-0.5
        self.rotary_in_fp32 = rotary_in_fp32
        self.layer_index = layer_index
        #: segment plans of block-diagonal masks, per mask object (shared model-wide by share_segment_plans)
        self.segment_plans = SegmentPlans()
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * d_head, d_model, bias=o_bias)
        self.q_norm = RMSNorm(d_head, qk_norm_eps, qk_norm_offset) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(d_head, qk_norm_eps, qk_norm_offset) if qk_norm_eps is not None else None
        self.use_attn_result = False
        self.force_pattern = False
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint()
        # attention statistics (fire only under an AttnStatsRequest, see attn_stats_request)
        self.hook_lse = HookPoint()
        self.hook_region = HookPoint()
        self.hook_row_mass = HookPoint()
        self.hook_colsum = HookPoint()
        self.hook_rows = HookPoint()
        self.run: AttnRun | None = None  # this run's statistics request / knockout (set by their contexts)

    # TransformerLens-style weight views (used by ActivationCache.stack_head_results and friends). Keys and
    # values are repeated to every query head, as TransformerLens's GroupedQueryAttention.W_K / W_V do.
    def _in_weight(self, proj: nn.Linear, heads: int) -> Tensor:
        w = rearrange(proj.weight, "(h dh) d -> h d dh", h=heads)
        return w if heads == self.n_heads else w.repeat_interleave(self.n_heads // heads, dim=0)

    def _in_bias(self, proj: nn.Linear, heads: int) -> Tensor:
        if proj.bias is None:
            return torch.zeros(self.n_heads, self.d_head, device=proj.weight.device, dtype=proj.weight.dtype)
        b = proj.bias.view(heads, self.d_head)
        return b if heads == self.n_heads else b.repeat_interleave(self.n_heads // heads, dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_weight(self.q_proj, self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_weight(self.k_proj, self.n_kv_heads)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_weight(self.v_proj, self.n_kv_heads)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        return self._in_bias(self.q_proj, self.n_heads)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self._in_bias(self.k_proj, self.n_kv_heads)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self._in_bias(self.v_proj, self.n_kv_heads)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return rearrange(self.o_proj.weight, "d (h dh) -> h dh d", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        if self.o_proj.bias is not None:
            return self.o_proj.bias
        return torch.zeros(self.o_proj.out_features, device=self.o_proj.weight.device, dtype=self.o_proj.weight.dtype)

    @property
    def stats_request(self) -> AttnStatsRequest | None:
        """The statistics request attached for this run (None outside :func:`attn_stats_request`)."""
        return None if self.run is None else self.run.stats

    def wants_pattern(self) -> bool:
        """True when a hook or the cache listens to the scores or the pattern."""
        return (
            self.force_pattern
            or bool(self.hook_attn_scores._forward_hooks)
            or bool(self.hook_pattern._forward_hooks)
            or bool(self.hook_attn_scores._backward_hooks)
            or bool(self.hook_pattern._backward_hooks)
        )

    def project(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cos: Tensor | None,
        sin: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Hooked q, k, v after QK-norm and rotary: ``[B, L, H, dh]`` and ``[B, L, Hkv, dh]``."""
        b, length, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, length, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(x).view(b, length, self.n_kv_heads, self.d_head))
        v = self.hook_v(self.v_proj(x).view(b, length, self.n_kv_heads, self.d_head))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None and sin is not None:
            q = apply_rotary(q, cos, sin, self.rotary_in_fp32)
            k = apply_rotary(k, cos, sin, self.rotary_in_fp32)
        return self.hook_rot_q(q), self.hook_rot_k(k), v

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cos: Tensor | None,
        sin: Tensor | None,
        mask: MaskSpec,
        cache: KVCache | None = None,
        last_queries: int | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``last_queries=n``: keys and values from every position, queries (and the output) for the last n."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        if last_queries is not None:
            q = q[:, -last_queries:]
            mask = dataclasses.replace(mask, q_offset=k.shape[1] - last_queries)
        run = self.run
        stats = run.stats if run is not None else None
        if run is not None:
            mask = run.mask(mask)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        path = attention_path(self.wants_pattern(), stats, needs_grad)
        if path == PATTERN:
            z = self._pattern_path(q, k, v, mask)
            if stats is not None:
                with torch.no_grad():  # statistics beside the materialised pattern are read-outs, never differentiated
                    self._stats_path(q, k, v, mask, stats)
        elif path == STATS_BESIDE_FAST:
            with torch.no_grad():  # statistics are read-outs; the output keeps its autograd graph
                self._stats_path(q, k, v, mask, stats)
            z = self._fast_path(q, k, v, mask)  # the same MaskSpec, knockout included
        elif path == STATS:
            z = self._stats_path(q, k, v, mask, stats)
        else:
            z = self._fast_path(q, k, v, mask)
        z = self.hook_z(z)
        if self.use_attn_result:
            w = rearrange(self.o_proj.weight, "d (h dh) -> h dh d", h=self.n_heads)
            result = self.hook_result(einsum(z, w, "b l h dh, h dh d -> b l h d"))
            return result.sum(dim=2) + self.b_O
        return self.o_proj(z.reshape(z.shape[0], z.shape[1], -1))

    def _expand_kv(self, t: Tensor) -> Tensor:
        rep = self.n_heads // self.n_kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=2)

    def _pattern_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        """Materialise, hook and (if a hook edited them) use the scores and pattern.

        When no hook replaced or edited either tensor in place (reading and caching do not), the output is
        the fast path's, so what is cached elsewhere does not depend on whether a pattern is cached: it is
        bit-identical to a run without pattern hooks, and with autograd on, gradients still reach the pattern
        and the scores exactly as through ``pattern @ v``. An edited pattern is used as ``pattern @ v``.
        """
        lq, lk = q.shape[1], k.shape[1]
        ke, ve = self._expand_kv(k), self._expand_kv(v)
        raw_scores = einsum(q, ke, "b q h d, b k h d -> b h q k") * self.scale
        visible = mask.dense(lq, lk, q.device)[:, None]  # B|1 1 q k
        raw_scores = raw_scores.masked_fill(~visible, float("-inf"))
        scores_version = raw_scores._version
        scores = self.hook_attn_scores(raw_scores)
        raw_pattern = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(q.dtype)  # masked rows -> 0
        pattern_version = raw_pattern._version
        pattern = self.hook_pattern(raw_pattern)
        edited = (
            scores is not raw_scores or raw_scores._version != scores_version
            or pattern is not raw_pattern or raw_pattern._version != pattern_version
        )
        if edited:
            return einsum(pattern, ve, "b h q k, b k h d -> b q h d")
        if not (torch.is_grad_enabled() and pattern.requires_grad):
            return self._fast_path(q, k, v, mask)
        # Same value as the fast path (the second term is exactly zero), and the exact gradients of
        # ``pattern @ v``: v through the fast path, q and k only through the pattern (so a retained or
        # backward-hooked pattern / score gradient is TransformerLens's, and nothing is counted twice).
        fast = self._fast_path(q.detach(), k.detach(), v, mask)
        return fast + einsum(pattern - pattern.detach(), ve.detach(), "b h q k, b k h d -> b q h d")

    def _fast_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        lq, lk = q.shape[1], k.shape[1]
        only_segments = (
            mask.doc_ids is not None
            and not mask.causal
            and mask.window == 0
            and mask.key_valid is None
            and mask.bidir_ids is None
            and mask.knockout is None
            and lq == lk
        )
        if only_segments:
            return self._segment_path(q, k, v, mask)
        if mask.is_plain_causal() and (lq == lk or not mask.causal):
            k, v = self._expand_kv(k), self._expand_kv(v)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask.causal and lq > 1, scale=self.scale)
            return out.transpose(1, 2)
        # --- issue 17: masks SDPA cannot express run without an [Lq, Lk] tensor (components/masked_attention.py)
        return masked_attention(q, k, v, mask, self.scale)
        # --- end issue 17

    def _segment_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec) -> Tensor:
        """Block-diagonal non-causal attention as batched SDPA over equal-length segments."""
        b, length = q.shape[:2]
        k, v = self._expand_kv(k), self._expand_kv(v)
        qf, kf, vf = (t.reshape(b * length, self.n_heads, self.d_head) for t in (q, k, v))
        out = torch.empty_like(qf)
        for idx in segment_plan(mask, self.segment_plans):  # S n
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (qf, kf, vf))  # S H n dh
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)
            out[idx.reshape(-1)] = o.transpose(1, 2).reshape(-1, self.n_heads, self.d_head)
        return out.view(b, length, self.n_heads, self.d_head)

    def _stats_path(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, req: AttnStatsRequest) -> Tensor:
        """Output via the ``kernels`` package, plus (in statistics layers) the requested statistics and hooks."""
        from kernels import attn_stats

        b, lq = q.shape[:2]
        lk = k.shape[1]

        def ids(t: Tensor | None, n: int, what: str) -> Tensor | None:
            if t is None:
                return None
            if t.shape[-1] != n:
                raise ValueError(
                    f"AttnStatsRequest.{what} has {t.shape[-1]} positions but this attention call has {n} "
                    f"({'queries' if what.startswith(('q_', 'colsum', 'rows')) else 'keys'}); build the ids from "
                    "this run's token layout (LM) or vision rows (vision tower), and do not attach a request "
                    "to decoding steps"
                )
            return t.to(q.device)

        rows = req.rows
        if rows is not None and rows.numel() and int(rows.max()) >= lq:
            raise ValueError(f"AttnStatsRequest.rows holds position {int(rows.max())} but this call has {lq} queries")
        st = attn_stats(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            mask,
            key_group_ids=ids(req.key_group_ids, lk, "key_group_ids"),
            q_group_ids=ids(req.q_group_ids, lq, "q_group_ids"),
            colsum_q_group_ids=ids(req.colsum_q_group_ids, lq, "colsum_q_group_ids"),
            colsum_q_weights=None if req.colsum_q_weights is None else req.colsum_q_weights.to(q.device),
            colsum=req.colsum,
            rows=None if rows is None else rows.to(q.device),
            return_row_mass=req.row_mass,
            scale=self.scale,
            backend=req.backend,
        )
        self.hook_lse(st.lse)
        for hook, value in (
            (self.hook_region, st.region),
            (self.hook_row_mass, st.row_mass),
            (self.hook_colsum, st.colsum),
            (self.hook_rows, st.rows),
        ):
            if value is not None:
                hook(value)
        return st.out.transpose(1, 2)
