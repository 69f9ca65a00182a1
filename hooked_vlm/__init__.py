"""hooked_vlm: hooked, Hugging Face-exact reimplementations of vision-language models.

Quick start::

    from hooked_vlm import HookedVLM
    model = HookedVLM.from_pretrained("path/to/Qwen2-VL-2B-Instruct")
    logits, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
"""

from hooked_vlm.components.attention import AttnStatsRequest, attn_stats_request
from hooked_vlm.errors import CheckpointError, InputError, UnsupportedModelError
from hooked_vlm.layout import TokenLayout
from hooked_vlm.model import HookedVLM

__all__ = [
    "HookedVLM",
    "TokenLayout",
    "AttnStatsRequest",
    "attn_stats_request",
    "InputError",
    "CheckpointError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
