"""Deprecated module path: soft-capping moved to :mod:`hooked_vlm.components.softcap` (the shared decoder reads
``DecoderSpec.attn_softcap``); an alias for one release."""

from hooked_vlm.components.softcap import SoftcapAttention, SoftcapUnembed, softcap

__all__ = ["SoftcapAttention", "SoftcapUnembed", "softcap"]
