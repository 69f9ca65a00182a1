"""The family contract: every family folder registers one ``FAMILY`` that loading, the CLI and the tiny models read,
declares its hooks, and runs the one forward skeleton (``vision.hook_out`` fires once; ``vision_features=`` is
validated in one place). New families are picked up automatically (``registry.families()``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hooked_vlm import loading, tiny
from hooked_vlm.cli import InputRequest
from hooked_vlm.errors import InputError
from hooked_vlm.families.registry import GENERIC_INPUTS, expand_hooks, families, family_for_architecture, family_of
from hooked_vlm.hook_table import describe_hook
from hooked_vlm.tiny_tokenizer import build_tiny_tokenizer

FAMILIES = {fam.name: fam for fam in families()}
TINY = [(fam.name, t.name) for fam in families() for t in fam.tiny_models]
GENERATIVE_TINY = [(f, n) for f, n in TINY if FAMILIES[f].generative]


def test_the_existing_families_are_discovered_each_in_its_own_folder():
    assert {"qwen_vl", "llava", "gemma3", "clip"} <= set(FAMILIES)
    root = Path(__import__("hooked_vlm").__file__).parent / "families"
    for fam in families():
        files = {p.name for p in (root / fam.name).glob("*.py")}
        assert {"__init__.py", "model.py", "preprocess.py"} <= files, fam.name
        if fam.generative:
            assert "layout.py" in files, fam.name
        assert fam.module == f"hooked_vlm.families.{fam.name}.model"


def test_registry_loading_and_tiny_models_agree():
    archs = [a for fam in families() for a in fam.architectures]
    assert len(archs) == len(set(archs)), "two families claim one architecture"
    assert sorted(loading.ARCHITECTURE_MODULES) == sorted(archs)
    for fam in families():
        for arch in fam.architectures:
            assert family_for_architecture(arch) is fam
        for t in fam.tiny_models:
            assert t.name in tiny.TINY_MODELS
            assert loading.builtin_models()[t.name].name == t.name
        for config_family in fam.config_families:
            assert family_of(config_family) is fam
        for model_type, arch in fam.model_types:
            assert loading._arch_from_model_type(model_type) == arch


def test_listing_families_imports_no_torch():
    code = (
        "import sys\nfrom hooked_vlm.families.registry import families\nfrom hooked_vlm import loading, tiny\n"
        "assert len(families()) >= 4 and len(tiny.TINY_MODELS) >= 10 and loading.ARCHITECTURE_MODULES\n"
        "assert 'torch' not in sys.modules, 'listing families imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family,name", TINY)
def test_every_declared_hook_exists(family, name):
    fam = FAMILIES[family]
    model = tiny.tiny_model(name)
    assert type(model) is fam.load_class()
    n_layers = getattr(model.cfg, "n_layers", 0) or len(getattr(getattr(model, "text", None), "blocks", []))
    n_vision = len(model.vision.blocks)
    declared = expand_hooks(fam.hooks, n_layers, n_vision)
    missing = [h for h in declared if h not in model.hook_dict]
    assert declared and not missing, f"{name} lacks declared hooks {missing[:5]}"
    # hook shapes have one source, hooked_vlm.hook_table (the README's table and model.hook_table() read it too)
    undocumented = [h for h in fam.hooks if describe_hook(h.format(i=0, j=0)) == "see docstring"]
    assert not undocumented, f"add the shapes of {undocumented} to hooked_vlm.hook_table._SHAPES"
    if fam.generative:
        assert set(model.input_names) == set(fam.input_schema.names)
        assert model.input_schema() == fam.input_schema
        assert set(GENERIC_INPUTS) == set(model.generic_inputs)


def _inputs(family: str, name: str, model) -> dict:
    """One prompt with one image, built by the family's registered input builder (as ``hooked-vlm inspect``)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(56, 56, 3), dtype=np.uint8)
    request = InputRequest(build_tiny_tokenizer(), "<image> what is the red circle", images=[image], tiny=True,
                           family=model.cfg.family)
    return FAMILIES[family].load_input_builder()(request)


@pytest.mark.parametrize("family,name", GENERATIVE_TINY)
def test_vision_hook_out_fires_once_and_vision_features_are_checked_in_one_place(family, name):
    model = tiny.tiny_model(name)
    inputs = _inputs(family, name, model)
    fired = []
    model.add_hook("vision.hook_out", lambda t, hook: fired.append(t.detach().clone()))
    logits = model(**inputs)
    model.reset_hooks()
    assert len(fired) == 1
    layout = model.layout(**inputs)
    n_visual = int((layout.item[0] >= 0).sum())
    assert n_visual > 0 and fired[0].shape[:2] == (1, n_visual)
    # the features written into the visual positions are what the hook saw: hook_embed there == hook_out
    _, cache = model.run_with_cache(**inputs, names_filter="hook_embed")
    visual = (layout.item[0] >= 0).nonzero().flatten()
    torch.testing.assert_close(cache["hook_embed"][0, visual], fired[0][0, :n_visual], rtol=0, atol=0)
    # encode_vision == the hook, and feeding it back reproduces the logits without the tower
    feats = model.encode_vision(**inputs)
    torch.testing.assert_close(feats, fired[0], rtol=0, atol=0)
    fired.clear()
    model.add_hook("vision.hook_out", lambda t, hook: fired.append(t))
    again = model(**inputs, vision_features=feats)
    model.reset_hooks()
    assert len(fired) == 1
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="vision_features must be"):
        model(**inputs, vision_features=feats[..., :-1])
    with pytest.raises(InputError, match="more visual tokens than their row holds"):
        model(**inputs, vision_features=feats[:, : n_visual - 1])
