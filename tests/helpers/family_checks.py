"""Checks every family's test file runs the same way: logits against transformers, the save / load round trip and
``hooked-vlm inspect`` on a built-in tiny model."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch


def max_logit_diff(hf: Any, model: Any, inputs: dict[str, Any]) -> float:
    """Largest |logit difference| between the transformers model and its hooked twin over attended positions."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(**inputs).logits
        out = model(**inputs)
    return float((ref - out)[inputs["attention_mask"].bool()].abs().max())


def reload_saved(hf: Any, tmp_path: Path, cls: type) -> Any:
    """``hf.save_pretrained`` then ``HookedVLM.from_pretrained``: the loaded model, checked to be ``cls``."""
    from hooked_vlm import HookedVLM

    hf.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(str(tmp_path))
    assert isinstance(loaded, cls), type(loaded)
    return loaded


def same_logits(a: Any, b: Any, inputs: dict[str, Any]) -> bool:
    """Whether two hooked models give bit-identical logits on ``inputs``."""
    with torch.no_grad():
        return torch.equal(a(**inputs), b(**inputs))


def cli_inspect(tmp_path: Path, model: str, hook: str, *extra: str) -> tuple[int, str, torch.Tensor]:
    """Run ``hooked-vlm inspect --model <model> ... --hooks <hook>``: (exit code, stdout, the saved hook tensor)."""
    from safetensors.torch import load_file

    from hooked_vlm import cli

    out = tmp_path / "inspect.safetensors"
    stdout = io.StringIO()
    code = cli.main(["inspect", "--quiet", "--model", model, *extra, "--hook-table", "none", "--hooks", hook,
                     "--out", str(out)], stdout=stdout)
    return code, stdout.getvalue(), (load_file(out)[hook] if code == 0 else None)


def tiny_pair(name: str, seed: int = 0, **config_overrides: Any) -> tuple[Any, Any]:
    """A random-weight transformers tiny model and its hooked twin (same weights)."""
    from hooked_vlm.loading import from_hf
    from hooked_vlm.tiny import tiny_hf_model

    hf = tiny_hf_model(name, seed=seed, **config_overrides)
    return hf, from_hf(hf)


def stats_rows_match_pattern(model: Any, inputs: dict[str, Any], rows: torch.Tensor, key_group_ids: torch.Tensor) -> Any:
    """Run the attention-statistics path (torch backend) and check it changes no logit and that its ``hook_rows``
    equal the cached ``hook_pattern`` rows of every layer; returns the statistics cache."""
    from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request

    with torch.no_grad():
        ref, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("blocks") and n.endswith("attn.hook_pattern"))
        req = AttnStatsRequest(rows=rows, key_group_ids=key_group_ids, backend="torch")
        with attn_stats_request(model, req):
            logits, stats = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith(("hook_rows", "hook_region")))
    valid = inputs["attention_mask"].bool()
    assert (logits - ref)[valid].abs().max() < 1e-5
    for layer in range(model.cfg.n_layers):
        pattern, got = cache[f"blocks.{layer}.attn.hook_pattern"], stats[f"blocks.{layer}.attn.hook_rows"]
        for b in range(rows.shape[0]):
            assert torch.allclose(got[b], pattern[b][:, rows[b]], atol=1e-5), (layer, b)
    return stats
