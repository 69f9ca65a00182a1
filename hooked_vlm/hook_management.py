"""Hook management shared by every hooked model: TransformerLens semantics plus name checking.

Unknown hook names raise a ``KeyError`` listing the closest valid names (TransformerLens would raise a
bare ``KeyError`` or, for a typo in ``names_filter``, silently cache nothing), and ``run_with_cache``
returns a TransformerLens ``ActivationCache``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.HookedRootModule import HookedRootModule


class CheckedHooksMixin(HookedRootModule):
    """A ``HookedRootModule`` whose hook entry points validate names."""

    def check_hook_names(self, names: str | Sequence[str]) -> None:
        """Raise a helpful error for hook names that do not exist, listing the closest valid ones."""
        for name in [names] if isinstance(names, str) else names:
            if name not in self.hook_dict:
                close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
                hint = f" Closest valid names: {close}." if close else ""
                raise KeyError(
                    f"Unknown hook name {name!r}.{hint} See model.hook_dict or model.hook_table() "
                    "(and the README's hook table) for every hook point."
                )

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

        Only the requested hooks are attached, so caching residual hooks computes no attention pattern.
        """
        if isinstance(names_filter, (str, list, tuple)):
            self.check_hook_names([names_filter] if isinstance(names_filter, str) else list(names_filter))
            if isinstance(names_filter, tuple):
                names_filter = list(names_filter)
        out, cache_dict = super().run_with_cache(
            *model_args, names_filter=names_filter, device=device, remove_batch_dim=remove_batch_dim, **kwargs
        )
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
