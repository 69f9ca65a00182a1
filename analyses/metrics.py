"""Scalar read-outs of model logits for patching, tracing and knockout sweeps.

A *metric* is any callable ``logits [B, L, V] -> [B]`` (one number per sequence); a sweep calls it on
the logits of every patched variant, with the same batch size ``B`` as the inputs the sweep was given,
so per-example answer ids line up. Custom callables work as long as they follow that contract (a
0-d result is broadcast to ``[B]``). The factories below build the common ones and carry a readable
``name`` for manifests and tables:

* :func:`logit_diff` -- logit(correct) - logit(incorrect);
* :func:`answer_logprob` / :func:`answer_prob` -- log p(answer) / p(answer);
* :func:`kl_divergence` -- KL(reference || patched) of next-token distributions;
* :func:`mc_margin` -- multiple-choice margin: logit of the correct option minus the best other option;
* :func:`normalized_recovery` -- ``(patched - corrupt) / (clean - corrupt)``: 0 = as corrupted,
  1 = fully recovered.

The read-out position defaults to the last position (``pos=-1``); for right-padded batches pass a
``[B]`` tensor of positions (e.g. ``attention_mask.sum(-1) - 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "Metric",
    "NamedMetric",
    "as_metric",
    "logit_diff",
    "answer_logprob",
    "answer_prob",
    "kl_divergence",
    "mc_margin",
    "normalized_recovery",
    "metric_name",
    "select_position",
]

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]]
IdLike = int | Sequence[int] | Int[Tensor, "batch"]
PosLike = int | Sequence[int] | Int[Tensor, "batch"]


@dataclass(frozen=True)
class NamedMetric:
    """A metric callable with a stable name (recorded in sweep manifests).

    ``reads="last"`` declares that only the last position's logits are read; sweeps then compute the
    unembedding at that position only (exact, and it saves a ``[batch, pos, vocab]`` tensor per forward
    -- gigabytes at a 150k vocabulary). Custom callables default to ``"all"``.
    """

    fn: Metric
    name: str
    reads: str = "all"

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        return _as_batch(self.fn(logits), logits.shape[0])

    def __repr__(self) -> str:
        return f"NamedMetric({self.name})"


def metric_name(metric: Callable) -> str:
    """A readable, stable name for ``metric`` (its ``name`` attribute, or its qualified name)."""
    name = getattr(metric, "name", None)
    if isinstance(name, str):
        return name
    mod = getattr(metric, "__module__", "") or ""
    qual = getattr(metric, "__qualname__", None) or type(metric).__qualname__
    return f"{mod}.{qual}" if mod else qual


def as_metric(metric: Callable, name: str | None = None, reads: str = "all") -> NamedMetric:
    """Wrap a custom callable ``logits -> [B] (or scalar)`` as a :class:`NamedMetric`.

    Pass ``reads="last"`` only if the callable reads nothing but ``logits[:, -1]``.
    """
    if isinstance(metric, NamedMetric) and name is None:
        return metric
    if reads not in ("all", "last"):
        raise ValueError(f"reads must be 'all' or 'last', got {reads!r}")
    return NamedMetric(metric, name or metric_name(metric), reads)


def _reads(pos: PosLike) -> str:
    return "last" if isinstance(pos, int) and pos == -1 else "all"


def _as_batch(value: Tensor | float, batch: int) -> Float[Tensor, "batch"]:
    value = torch.as_tensor(value)
    if value.ndim == 0:
        return value.expand(batch)
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(
            f"a metric must return one value per sequence (shape [{batch}]) or a scalar; got shape "
            f"{tuple(value.shape)}"
        )
    return value


def _ids(ids: IdLike, batch: int, device: torch.device) -> Int[Tensor, "batch"]:
    t = torch.as_tensor(ids, device=device, dtype=torch.long)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape[0] != batch:
        raise ValueError(f"got {t.shape[0]} per-example ids for a batch of {batch}")
    return t


def select_position(logits: Float[Tensor, "batch pos vocab"], pos: PosLike = -1) -> Float[Tensor, "batch vocab"]:
    """Logits at read-out position ``pos`` (an int for all rows, or one position per row)."""
    if isinstance(pos, int):
        return logits[:, pos, :]
    p = _ids(pos, logits.shape[0], logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), p, :]


def logit_diff(correct: IdLike, incorrect: IdLike, pos: PosLike = -1) -> NamedMetric:
    """logit[correct] - logit[incorrect] at ``pos``; ids are ints or per-example ``[B]``."""

    def fn(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        x = select_position(logits, pos).float()
        b = torch.arange(x.shape[0], device=x.device)
        return x[b, _ids(correct, x.shape[0], x.device)] - x[b, _ids(incorrect, x.shape[0], x.device)]

    return NamedMetric(fn, f"logit_diff(correct={_fmt(correct)}, incorrect={_fmt(incorrect)}, pos={_fmt(pos)})",
                       _reads(pos))


def answer_logprob(answer: IdLike, pos: PosLike = -1) -> NamedMetric:
    """log p(answer) under the softmax at ``pos``."""

    def fn(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        x = select_position(logits, pos).float().log_softmax(-1)
        b = torch.arange(x.shape[0], device=x.device)
        return x[b, _ids(answer, x.shape[0], x.device)]

    return NamedMetric(fn, f"answer_logprob(answer={_fmt(answer)}, pos={_fmt(pos)})", _reads(pos))


def answer_prob(answer: IdLike, pos: PosLike = -1) -> NamedMetric:
    """p(answer) at ``pos`` (the quantity ROME's causal tracing reports)."""
    lp = answer_logprob(answer, pos)
    return NamedMetric(lambda logits: lp(logits).exp(), f"answer_prob(answer={_fmt(answer)}, pos={_fmt(pos)})",
                       _reads(pos))


def kl_divergence(
    reference_logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "batch vocab"], pos: PosLike = -1
) -> NamedMetric:
    """KL(reference || patched) of the next-token distributions at ``pos``, in nats.

    ``reference_logits`` are usually the clean run's logits ([B, L, V], read at ``pos``) or already
    the read-out row ([B, V]). 0 means the patched run predicts exactly like the reference.
    """
    ref = reference_logits.detach()
    ref_row = select_position(ref, pos) if ref.ndim == 3 else ref
    ref_logp = ref_row.float().log_softmax(-1)

    def fn(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        logp = select_position(logits, pos).float().log_softmax(-1)
        r = ref_logp.to(logp.device)
        if r.shape[0] != logp.shape[0]:
            raise ValueError(f"reference has batch {r.shape[0]}, patched logits batch {logp.shape[0]}")
        return (r.exp() * (r - logp)).sum(-1)

    return NamedMetric(fn, f"kl_divergence(pos={_fmt(pos)})", _reads(pos))


def mc_margin(
    choice_ids: Sequence[int] | Int[Tensor, "batch n_choices"], correct: IdLike, pos: PosLike = -1
) -> NamedMetric:
    """Multiple-choice margin: logit of the correct option minus the largest logit of the others.

    ``choice_ids`` are the option tokens (e.g. the ids of "A", "B", "C", "D"), shared ``[K]`` or per
    example ``[B, K]``; ``correct`` is the index of the right option within them (int or ``[B]``).
    Positive iff the model would pick the correct option among the choices.
    """
    choices_t = torch.as_tensor(choice_ids, dtype=torch.long)
    if choices_t.ndim not in (1, 2) or choices_t.shape[-1] < 2:
        raise ValueError("choice_ids must hold at least two options, shape [K] or [B, K]")

    def fn(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch"]:
        x = select_position(logits, pos).float()
        bsz = x.shape[0]
        ch = choices_t.to(x.device)
        ch = ch.expand(bsz, -1) if ch.ndim == 1 else ch
        if ch.shape[0] != bsz:
            raise ValueError(f"choice_ids has {ch.shape[0]} rows for a batch of {bsz}")
        opt = x.gather(1, ch)  # B K
        idx = _ids(correct, bsz, x.device)
        right = opt.gather(1, idx[:, None])[:, 0]
        others = opt.scatter(1, idx[:, None], float("-inf"))
        return right - others.max(-1).values

    return NamedMetric(fn, f"mc_margin(choices={_fmt(choice_ids)}, correct={_fmt(correct)}, pos={_fmt(pos)})",
                       _reads(pos))


def normalized_recovery(
    patched: Tensor | float, clean: Tensor | float, corrupt: Tensor | float, eps: float = 1e-12
) -> Tensor:
    """(patched - corrupt) / (clean - corrupt): 0 = corrupted behaviour, 1 = clean behaviour.

    Returns NaN where ``|clean - corrupt| <= eps`` (the two runs do not differ, so recovery is
    undefined) rather than dividing by ~0.
    """
    patched, clean, corrupt = (torch.as_tensor(v, dtype=torch.float64) for v in (patched, clean, corrupt))
    denom = clean - corrupt
    out = (patched - corrupt) / denom
    return torch.where(denom.abs() > eps, out, torch.full_like(out, float("nan")))


def _fmt(x: object) -> str:
    if isinstance(x, Tensor):
        return str(x.tolist()) if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    return str(list(x)) if isinstance(x, (tuple, list)) else str(x)
