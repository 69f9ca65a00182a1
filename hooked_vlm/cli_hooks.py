"""Which hooks ``hooked-vlm inspect --hooks`` caches, and what caching them will cost.

Globs follow :func:`hooked_vlm.hook_management.expand_hook_names` (the Python ``names_filter`` uses the
same). Some hook points fire only when asked for: attention patterns / scores (they build the L x L
matrix), per-head results (``use_attn_result``) and attention statistics (an ``AttnStatsRequest``). A
pattern *names* such a hook when its last dotted part is that hook's name written out
(``blocks.*.attn.hook_pattern``); a broader glob (``*``, ``blocks.0.attn.*``) skips them unless the flag
that asks for them is given (``--pattern``, ``--attn-result``, ``--attn-stats``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hooked_vlm.errors import InputError
from hooked_vlm.hook_management import expand_hook_names, is_glob

#: opt-in hook leaf name -> the inspect flag that includes it in broad globs
OPT_IN_FLAGS = {
    "hook_pattern": "--pattern",
    "hook_attn_scores": "--pattern",
    "hook_result": "--attn-result",
    "hook_lse": "--attn-stats",
    "hook_region": "--attn-stats",
    "hook_row_mass": "--attn-stats",
    "hook_colsum": "--attn-stats",
    "hook_rows": "--attn-stats",
}
STAT_LEAVES = frozenset(leaf for leaf, flag in OPT_IN_FLAGS.items() if flag == "--attn-stats")


@dataclass
class HookSelection:
    """The hooks to cache, and the opt-in ones a broad glob skipped (flag -> names)."""

    names: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def wants_stats(self) -> bool:
        return any(n.rsplit(".", 1)[-1] in STAT_LEAVES for n in self.names)

    def skipped_note(self) -> str | None:
        """One line naming what was skipped and how to include it (None when nothing was)."""
        if not self.skipped:
            return None
        parts = [f"{len(names)} {'/'.join(sorted({n.rsplit('.', 1)[-1] for n in names}))} ({flag})" for flag, names in self.skipped.items()]
        return "note: the hook globs skipped opt-in hooks: " + "; ".join(parts) + ". Add the flag in brackets to include them."


def _opt_in_leaf(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    return leaf if leaf in OPT_IN_FLAGS and ".attn." in f".{name}" else None


def select_hooks(patterns: Sequence[str], available: Sequence[str], flags: set[str] | frozenset[str] = frozenset()) -> HookSelection:
    """Hooks matching ``patterns`` (names or globs, model order); opt-in hooks only when named or flagged.

    ``flags``: the opt-in flags given (``"--pattern"``, ``"--attn-result"``, ``"--attn-stats"``). Vision-tower
    attention statistics need per-patch group ids, which the command line cannot give: naming one is an
    error, globs skip them.
    """
    chosen: set[str] = set()
    skipped: dict[str, list[str]] = {}
    for pattern in patterns:
        matched = expand_hook_names([pattern], list(available))
        last = pattern.rsplit(".", 1)[-1]
        named_leaf = None if is_glob(last) else last
        kept = []
        for name in matched:
            leaf = _opt_in_leaf(name)
            vision_stat = leaf in STAT_LEAVES and name.startswith("vision.")
            if vision_stat and named_leaf == leaf:
                raise InputError(
                    f"'{pattern}' names vision-tower attention statistics, which need per-patch group ids: use "
                    "model.run_with_cache(..., vision_attn_stats=AttnStatsRequest(...)) in Python"
                )
            if leaf is None or (not vision_stat and (named_leaf == leaf or OPT_IN_FLAGS[leaf] in flags)):
                kept.append(name)
            else:
                skipped.setdefault("Python API only" if vision_stat else OPT_IN_FLAGS[leaf], []).append(name)
        if not kept:
            raise InputError(
                f"'{pattern}' matches only opt-in hooks ({', '.join(matched[:3])}{' ...' if len(matched) > 3 else ''}); "
                "add --pattern (patterns / scores), --attn-result (per-head results) or --attn-stats (statistics)"
            )
        chosen.update(kept)
    for flag in list(skipped):
        skipped[flag] = [n for n in skipped[flag] if n not in chosen]
        if not skipped[flag]:
            del skipped[flag]
    return HookSelection([n for n in available if n in chosen], skipped)


def enable_opt_in(model: Any, names: Sequence[str]) -> None:
    """Switch on per-head results for the attentions whose ``hook_result`` was selected."""
    for name in names:
        if name.endswith(".attn.hook_result"):
            model.get_submodule(name.removesuffix(".hook_result")).use_attn_result = True


# ----- memory estimate ---------------------------------------------------------------------------------
_DIM = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\(kv\))?|\d+")


def estimate_cache_bytes(names: Sequence[str], model: Any, batch: int, seq_len: int, visual_tokens: int, element_bytes: int) -> tuple[int, list[str]]:
    """Bytes the cached language-model hooks (and ``vision.hook_out``) will take, from their documented shapes.

    Returns ``(bytes, names not counted)``: vision-tower internals (their patch counts depend on the
    family's preprocessing) and statistics (group counts) are left out and listed.
    """
    from hooked_vlm.hook_table import describe_hook

    cfg = model.cfg
    sizes = {
        "B": batch, "L": seq_len, "Lq": seq_len, "Lk": seq_len, "d": cfg.d_model, "d_model": cfg.d_model,
        "H": cfg.n_heads, "Hkv": cfg.n_key_value_heads, "dh": cfg.d_head, "m": cfg.d_mlp, "M": visual_tokens,
        "V": cfg.d_vocab, "1": 1,
    }
    total, uncounted = 0, []
    for name in names:
        shape = describe_hook(name)
        dims = _DIM.findall(shape)
        if (name.startswith("vision.") and name != "vision.hook_out") or not dims or any(
            d not in sizes and d != "H(kv)" for d in dims
        ):
            uncounted.append(name)
            continue
        n = 1
        for d in dims:
            if d == "H(kv)":
                n *= cfg.n_heads if ".q_norm." in name else cfg.n_key_value_heads
            else:
                n *= sizes[d]
        total += n * element_bytes
    return total, uncounted
