"""Hook management shared by every hooked model: TransformerLens semantics plus name checking.

Unknown hook names raise a :class:`HookNameError` (a ``KeyError``) listing the closest valid names
(TransformerLens would raise a bare ``KeyError`` or, for a typo in ``names_filter``, silently cache
nothing); a ``names_filter`` string or list may use the same globs as ``hooked-vlm inspect --hooks``
(``"blocks.*.hook_resid_post"``, ``"vision.blocks.[01].attn.hook_q"``); ``run_with_cache`` returns an
``ActivationCache`` whose missing keys get the same suggestions.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule

_GLOB_CHARS = frozenset("*?[")


class HookNameError(KeyError):
    """A hook name or glob that names no hook point; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def expand_hook_names(patterns: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Hook names matching each exact name or glob (``fnmatch`` syntax), in ``available``'s order.

    A pattern that matches nothing raises :class:`HookNameError` with the closest valid names.
    """
    chosen: set[str] = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = [name for name in available if fnmatch.fnmatchcase(name, pattern)] if is_glob(pattern) else (
            [pattern] if pattern in available else []
        )
        if not matched:
            close = difflib.get_close_matches(pattern, list(available), n=5, cutoff=0.5)
            if is_glob(pattern):
                what = f"No hook matches {pattern!r}." + (f" Closest: {', '.join(close)}." if close else "")
            else:
                what = f"Unknown hook name {pattern!r}." + (f" Closest valid names: {close}." if close else "")
            raise HookNameError(
                what
                + " See model.hook_dict or model.hook_table() (or `hooked-vlm inspect --hook-table full`) for every "
                "hook point; globs like 'blocks.*.hook_resid_post' work."
            )
        chosen.update(matched)
    return [name for name in available if name in chosen]


class HookedActivationCache(ActivationCache):
    """TransformerLens's ``ActivationCache``; a missing key lists the closest cached names and says whether
    the name is a real hook that was not cached (then: add it to ``names_filter``)."""

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except (KeyError, ValueError, AssertionError, IndexError) as err:
            if isinstance(key, str) and key in self.cache_dict:
                raise
            name = key if isinstance(key, str) else repr(key)
            cached = list(self.cache_dict)
            close = difflib.get_close_matches(name, cached, n=5, cutoff=0.5)
            hooks = getattr(self.model, "hook_dict", {})
            if isinstance(key, str) and key in hooks:
                hint = f"{key!r} is a hook point but was not cached: add it to names_filter."
            else:
                valid = difflib.get_close_matches(name, list(hooks), n=3, cutoff=0.5)
                hint = f"{name} is not a cached hook." + (f" Closest hook names: {valid}." if valid and valid != close else "")
            raise HookNameError(
                f"{hint}" + (f" Closest cached names: {close}." if close else f" Cached: {cached[:6]}{' ...' if len(cached) > 6 else ''}.")
            ) from err

    # --- i10b: residual writers besides attention and MLP (e.g. Qwen3-VL's DeepStack) ---------------------
    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True,
                        return_labels=False):  # type: ignore[override]
        """TransformerLens's decomposition, plus (``mode="all"``) each ``blocks.{l}.<hook>`` named in the model's
        ``extra_residual_hooks`` (what a family adds to the residual after block ``l``), so the components still
        sum exactly to the residual stream. Such a hook must be cached like ``attn_out`` / ``mlp_out``."""
        from transformer_lens.utilities.slice import Slice

        extra = tuple(getattr(self.model, "extra_residual_hooks", ()))
        if not extra or mode != "all":
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        components, labels = super().decompose_resid(layer, mlp_input, mode, False, pos_slice, incl_embeds, return_labels=True)
        n = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        pieces, names = list(components), list(labels)
        sliced = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        for l in range(n):
            for hook in extra:
                name = f"blocks.{l}.{hook}"
                if name in self.model.hook_dict:
                    after = max(i for i, label in enumerate(names) if label.startswith(f"{l}_")) + 1
                    pieces.insert(after, sliced.apply(self[name], dim=-2))
                    names.insert(after, f"{l}_{hook.removeprefix('hook_')}")
        stacked = torch.stack(pieces, dim=0)
        if apply_ln:
            stacked = self.apply_ln_to_stack(stacked, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stacked, names) if return_labels else stacked


class CheckedHooksMixin(HookedRootModule):
    """A ``HookedRootModule`` whose hook entry points validate names."""

    def check_hook_names(self, names: str | Sequence[str]) -> None:
        """Raise a helpful error for hook names that do not exist, listing the closest valid ones."""
        expand_hook_names([n for n in ([names] if isinstance(names, str) else names) if not is_glob(n)], list(self.hook_dict))

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:  # type: ignore[override]
        if isinstance(name, str):
            self.check_hook_names(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):  # type: ignore[override]
        """Temporary hooks, removed on exit even when the forward raises (TransformerLens semantics)."""
        self.check_hook_names([n for n, _ in list(fwd_hooks) + list(bwd_hooks) if isinstance(n, str)])
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as m:
            yield m

    def run_with_cache(self, *model_args: Any, names_filter=None, device=None, remove_batch_dim=False, **kwargs: Any):  # type: ignore[override]
        """Forward with caching; returns ``(output, ActivationCache)``.

        ``names_filter``: a callable, a hook name or glob, or a list of them (see :func:`expand_hook_names`).
        Only the requested hooks are attached, so caching residual hooks computes no attention pattern.
        ``incl_bwd=True`` also caches gradients (``name + "_grad"``) of a scalar output such as
        ``return_type="loss"``. ``reduction=CacheReduction(...)`` keeps only chosen positions or per-group
        reductions, downcasts, offloads or streams to disk at hook time (see :mod:`hooked_vlm.cache_reduction`).
        """
        # --- issue 17: reduce / downcast / offload / stream each cached activation at hook time
        reduction = kwargs.pop("reduction", None)
        if reduction is not None:
            from hooked_vlm.cache_reduction import run_with_reduced_cache

            return run_with_reduced_cache(
                self, *model_args, names_filter=names_filter, reduction=reduction, device=device,
                remove_batch_dim=remove_batch_dim, **kwargs,
            )
        # --- end issue 17
        if isinstance(names_filter, (str, list, tuple)):
            names_filter = expand_hook_names(names_filter, list(self.hook_dict))
        if kwargs.get("incl_bwd") and kwargs.get("return_type", "logits") in ("logits", "resid", None):
            raise ValueError(
                "incl_bwd=True backpropagates from the output, which must be a scalar: pass return_type='loss' "
                "(or use run_with_hooks with bwd_hooks and your own metric)"
            )
        pos_slice = kwargs.pop("pos_slice", None)
        out, cache_dict = super().run_with_cache(
            *model_args, names_filter=names_filter, device=device, remove_batch_dim=False, **kwargs
        )
        if pos_slice is not None:
            cache_dict = {name: slice_positions(name, t, pos_slice) for name, t in cache_dict.items()}
        if remove_batch_dim:
            cache_dict = {name: t[0] if t.dim() and t.shape[0] == 1 else t for name, t in cache_dict.items()}
        return out, HookedActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)


#: hook leaf -> dimension of its (query) positions in a batch-first activation; None: no position axis
_POSITION_DIM = {"hook_attn_scores": 2, "hook_pattern": 2, "hook_lse": 2, "hook_row_mass": 2,
                 "hook_region": None, "hook_colsum": None, "hook_rows": None}


def slice_positions(name: str, tensor: Any, pos_slice: Any) -> Any:
    """``run_with_cache(pos_slice=...)`` for one activation: language-model positions only.

    The slice selects sequence positions (``[B, L, ...]`` hooks on dim 1, patterns / scores / row statistics
    on their query dim 2). Vision-tower hooks (their axis is image patches, not sequence positions) and
    group statistics are cached whole. TransformerLens's own rule (the second- or third-from-last dim) would
    cut heads of ``hook_rot_q`` and patches of vision hooks.
    """
    from transformer_lens.utilities import Slice

    dim = _POSITION_DIM.get(name.rsplit(".", 1)[-1], 1)
    if name.startswith("vision.") or dim is None or tensor.dim() <= dim:
        return tensor
    return Slice.unwrap(pos_slice).apply(tensor, dim=dim)
