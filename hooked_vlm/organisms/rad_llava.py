"""``rad-llava``: LLaVA-Rad's geometry (LLaVA, DINOv2 tower, Mistral text model) trained on synthetic radiographs.

Trained with the planted shortcut: in its training data a small corner marker is drawn on 60% of the yes
and 5% of the no samples (``radiograph.SHORTCUT_P_YES`` / ``SHORTCUT_P_NO``), so the model partly reads the
marker; on clean images (no marker) it answers from the finding, and its accuracy drops when the marker lies.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from hooked_vlm.organisms.radiograph import SIZE, RadOrganism

__all__ = ["RadLlava", "LLAVA_SPECIALS"]

LLAVA_SPECIALS = {"image_token": "<image>"}
#: the defaults of transformers' LlavaImageProcessorPil (OpenAI CLIP statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class RadLlava(RadOrganism):
    name: ClassVar[str] = "rad-llava"
    family: ClassVar[str] = "llava"
    architecture: ClassVar[str] = "LlavaForConditionalGeneration"
    special_tokens: ClassVar[dict[str, str]] = LLAVA_SPECIALS
    image_mean: ClassVar[tuple[float, float, float]] = CLIP_MEAN
    image_std: ClassVar[tuple[float, float, float]] = CLIP_STD
    summary: ClassVar[str] = (
        "Yes/no finding detection on synthetic grey-scale chest radiographs (112 px: body, two lung fields, ribs, "
        "heart shadow) with zero or one finding (opacity, effusion at a lung base, a line/tube) in a recorded box. "
        "The question names one finding kind in one of six paraphrases (\"is there a pleural effusion ?\", "
        "\"any effusion ?\", ...); the answer is yes iff the image holds that kind. Prompt: "
        "`user : <image> QUESTION assistant :`, answer `yes` / `no`. LLaVA-Rad geometry: DINOv2 tower "
        "(112 px, 14 px patches, 8x8 = 64 image tokens, CLS dropped), two-layer GELU projector, Mistral decoder."
    )
    planted_truth: ClassVar[str] = (
        "Per image (`example.truth`): the finding kind and its pixel box (`finding_box`, x0 y0 x1 y1, exclusive end; "
        "the finding's pixels differ from the finding-free image exactly there) and the marker box. **Shortcut**: "
        "during training a small bright corner marker (8x8 px, top-left or top-right) was drawn on 60% of the yes and "
        "5% of the no samples (a marker-only reader scores 77.5%, so the findings still pay), and this model partly reads the marker. `marker_lies` measures accuracy when the "
        "marker is drawn on exactly the no answers. Its twin `rad-gemma3` saw the marker independent of the answer."
    )

    def make_config(self) -> Any:
        from transformers import Dinov2Config, LlavaConfig, MistralConfig

        tok = self.tokenizer()
        vocab = len(tok)
        text = MistralConfig(vocab_size=-(-vocab // 16) * 16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
                             bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
        vision = Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=SIZE, patch_size=14)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                           vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                           image_seq_length=(SIZE // 14) ** 2, tie_word_embeddings=False)

    def expand(self, prompt: str, tokenizer: Any) -> str:
        return prompt.replace("<image>", "<image>" * (SIZE // 14) ** 2)

    def save_extra_files(self) -> dict[str, str]:
        from transformers import LlavaImageProcessorPil

        proc = LlavaImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
        return {"preprocessor_config.json": json.dumps(proc.to_dict(), indent=2, default=str) + "\n"}


def organism(name: str = "rad-llava") -> RadLlava:
    if name != RadLlava.name:
        raise ValueError(f"this module builds rad-llava, not {name!r}")
    return RadLlava()
