"""The organisms' training loop: plain torch, AdamW with linear warmup and a cosine decay, fp32, seeded."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["answer_loss", "cosine_schedule", "linear_patch_embedding", "train_loop"]


def answer_loss(
    logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"], answer_mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy over the answer tokens only (position t predicts token t + 1)."""
    mask = answer_mask[:, 1:]
    if not bool(mask.any()):
        raise ValueError("answer_mask selects no token after position 0; the batch has no answer to learn")
    pred = logits[:, :-1][mask]
    return torch.nn.functional.cross_entropy(pred.float(), input_ids[:, 1:][mask])


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _StepBatches(torch.utils.data.Dataset):
    """Step ``s`` -> ``make_batch(s)``: lets a DataLoader worker build the next batches while the model trains."""

    def __init__(self, make_batch: Callable[[int], Any], steps: int) -> None:
        self.make_batch, self.steps = make_batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Any:
        return self.make_batch(step)


def _one_thread_worker(_: int) -> None:
    torch.set_num_threads(1)


def _batches(make_batch: Callable[[int], Any], steps: int, prefetch: bool) -> Any:
    """The batches of steps 0 .. steps-1 in order; with ``prefetch`` built ahead by one worker process (same values)."""
    if not prefetch:
        return (make_batch(s) for s in range(steps))
    return iter(torch.utils.data.DataLoader(_StepBatches(make_batch, steps), batch_size=None, shuffle=False, num_workers=1,
                                            prefetch_factor=4, worker_init_fn=_one_thread_worker,
                                            multiprocessing_context="fork"))


def _patch_as_linear(conv: torch.nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)`` for a Conv3d whose kernel covers its whole input, as the equal matrix product (CPU: several x faster)."""
    if tuple(x.shape[2:]) != tuple(conv.kernel_size):
        return torch.nn.Conv3d.forward(conv, x)
    w = conv.weight
    out = torch.nn.functional.linear(x.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1), conv.bias)
    return out.reshape(x.shape[0], w.shape[0], 1, 1, 1)


@contextlib.contextmanager
def linear_patch_embedding(model: torch.nn.Module) -> Iterator[None]:
    """While training, run every patch-embedding Conv3d (kernel = stride, no padding) as a linear map; restored after.

    Qwen-VL towers embed each ``(C, T, P, P)`` patch with a Conv3d whose kernel is the whole patch: the same
    function as one matrix product, which oneDNN's 3-D convolution computes several times slower on CPU.
    The module and its parameters stay in place (only its ``forward`` is shadowed), so what is saved is the
    plain transformers model.
    """
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == m.stride
             and m.padding == (0, 0, 0) and m.groups == 1 and m.dilation == (1, 1, 1)]
    for conv in convs:
        conv.forward = functools.partial(_patch_as_linear, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def train_loop(
    model: torch.nn.Module,
    make_batch: Callable[[int], Any],
    loss_fn: Callable[[torch.nn.Module, Any], Tensor],
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 50,
    seed: int = 0,
    grad_clip: float = 1.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    time_budget_s: float | None = None,
    prefetch: bool = False,
) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps on ``make_batch(step)``; returns the loss of every step.

    Deterministic for a given seed and thread count: the global torch seed is set before the first
    step and batches come from ``make_batch(step)``, which should itself be seeded by ``step``.
    ``time_budget_s``: stop after this many seconds instead (at most ``steps``), with the warmup and
    cosine decay laid over the wall-clock budget; the number of steps then depends on the machine, so
    record it (``len(losses)``) and pass it as ``steps`` to reproduce the run exactly.
    ``prefetch``: build the batches in one worker process ahead of the model (the second core of a 2-core
    machine); the batches are the same, so the run is too.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    torch.manual_seed(seed)
    model.float().train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    start = time.perf_counter()

    def factor(s: int) -> float:
        if time_budget_s is None:
            return cosine_schedule(s, steps, warmup_steps)
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (time.perf_counter() - start) / time_budget_s)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    for step, batch in enumerate(_batches(make_batch, steps, prefetch)):
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
            break
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            log(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return losses
