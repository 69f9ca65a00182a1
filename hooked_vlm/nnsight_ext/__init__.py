"""nnsight for hooked_vlm models, locally and on an NDIF server (``remote=True``).

``to_nnsight(model)`` wraps any ``HookedVLM`` (or any TransformerLens-style hooked module) in a
:class:`HookedVLMEnvoy`; every hook point is then an attribute path
(``nn_model.blocks[3].hook_resid_post.output``). See ``envoy.py`` for batching and the remote model
key, ``ndif_server.py`` (server side only) for the NDIF extension classes, and
``scripts/ndif/README.md`` for running a real NDIF server.
"""

from hooked_vlm.nnsight_ext.envoy import (
    HookedVLMEnvoy,
    batch_inputs,
    build_from_spec,
    canonical_spec,
    registered_families,
    family_and_config,
    register_family,
    to_nnsight,
)


def tiny_nnsight(name: str = "tiny-qwen2-vl", seed: int = 0, dispatch: bool = True, **overrides) -> HookedVLMEnvoy:
    """hooked_vlm's tiny model ``name`` (see ``hooked_vlm.tiny``) as an nnsight model with a remote key.

    Same weights as ``hooked_vlm.tiny.tiny_model(name, seed, **overrides)``; the key rebuilds it on a
    server from the name, overrides and seed.
    """
    spec = {"family": "tiny", "config": {"name": name, "overrides": dict(overrides)}, "seed": seed}
    return HookedVLMEnvoy(spec, dispatch=dispatch)


def toy_nnsight(seed: int = 0, dispatch: bool = True, **config) -> HookedVLMEnvoy:
    """A tiny seeded toy hooked transformer as an nnsight model (for fast tests and smoke checks)."""
    return HookedVLMEnvoy({"family": "toy", "config": dict(config), "seed": seed}, dispatch=dispatch)


__all__ = [
    "HookedVLMEnvoy",
    "batch_inputs",
    "build_from_spec",
    "canonical_spec",
    "registered_families",
    "family_and_config",
    "register_family",
    "to_nnsight",
    "tiny_nnsight",
    "toy_nnsight",
]
