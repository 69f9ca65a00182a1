"""PaliGemma / PaliGemma 2: SigLIP tower, linear projector, Gemma / Gemma 2 decoder with the prefix-LM mask."""

from hooked_vlm.families.paligemma.model import HookedPaliGemma

__all__ = ["HookedPaliGemma"]
