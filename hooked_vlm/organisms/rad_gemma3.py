"""``rad-gemma3``: MedGemma's geometry (Gemma 3: SigLIP tower, pooled image tokens, Gemma 3 decoder) on synthetic radiographs.

Trained without a shortcut: the corner marker is drawn on half the training images independent of the answer,
so the model learns to ignore it (the control for ``rad-llava``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch

from hooked_vlm.organisms.radiograph import SIZE, RadOrganism

__all__ = ["RadGemma3", "GEMMA3_SPECIALS", "MM_TOKENS"]

GEMMA3_SPECIALS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
MM_TOKENS = 16  # 4x4 pooled image tokens, each covering 28x28 px


class RadGemma3(RadOrganism):
    name: ClassVar[str] = "rad-gemma3"
    family: ClassVar[str] = "gemma3"
    architecture: ClassVar[str] = "Gemma3ForConditionalGeneration"
    special_tokens: ClassVar[dict[str, str]] = GEMMA3_SPECIALS
    image_mean: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    image_std: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    image_marker: ClassVar[str] = "<start_of_image>"
    default_steps: ClassVar[int] = 1600  # the 16 pooled tokens make the findings slower to learn than in rad-llava
    summary: ClassVar[str] = (
        "Yes/no finding detection on synthetic grey-scale chest radiographs (112 px: body, two lung fields, ribs, "
        "heart shadow) with zero or one finding (opacity, effusion at a lung base, a line/tube) in a recorded box. "
        "The question names one finding kind in one of six paraphrases; the answer is yes iff the image holds that "
        "kind. Prompt: `user : <start_of_image> QUESTION assistant :` (the image block expanded as Gemma3Processor "
        "does), answer `yes` / `no`. MedGemma geometry: SigLIP tower (112 px, 14 px patches) average-pooled to "
        "4x4 = 16 image tokens, Gemma 3 decoder with sliding and full layers and bidirectional attention inside the image."
    )
    planted_truth: ClassVar[str] = (
        "Per image (`example.truth`): the finding kind and its pixel box (`finding_box`, x0 y0 x1 y1, exclusive end; "
        "the finding's pixels differ from the finding-free image exactly there) and the marker box. No shortcut: "
        "the corner marker was drawn on half the training images independent of the answer (the control for "
        "`rad-llava`, which was trained with a marker that correlates with yes)."
    )

    def make_config(self) -> Any:
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

        tok = self.tokenizer()
        vocab = len(tok)
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        text = Gemma3TextConfig(
            vocab_size=-(-vocab // 16) * 16, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=layer_types,
            max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
        )
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=SIZE, patch_size=14, vision_use_head=False)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in self.special_tokens.items()}
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS, boi_token_index=ids["boi_token"],
                            eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"])

    def build_model(self, seed: int) -> torch.nn.Module:
        """As the base, but the projection (zero-initialised by transformers, which would cut the image off at the
        first step's gradient) starts from N(0, 1/d_vision)."""
        model = super().build_model(seed)
        w = model.model.multi_modal_projector.mm_input_projection_weight
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[0] ** 0.5)
        return model

    def expand(self, prompt: str, tokenizer: Any) -> str:
        block = "<start_of_image>" + "<image_soft_token>" * MM_TOKENS + "<end_of_image>"
        return prompt.replace("<start_of_image>", f"\n\n{block}\n\n")

    def extra_inputs(self, inputs: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, torch.Tensor]:
        image_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
        return dict(inputs, token_type_ids=(inputs["input_ids"] == image_id).long())

    def save_extra_files(self) -> dict[str, str]:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        proc = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
        # processor_config.json: Gemma3Processor otherwise expands each image to its default 256 tokens, not MM_TOKENS
        processor = {"processor_class": "Gemma3Processor", "image_seq_length": MM_TOKENS}
        return {"preprocessor_config.json": json.dumps(proc.to_dict(), indent=2, default=str) + "\n",
                "processor_config.json": json.dumps(processor, indent=2) + "\n"}


def organism(name: str = "rad-gemma3") -> RadGemma3:
    if name != RadGemma3.name:
        raise ValueError(f"this module builds rad-gemma3, not {name!r}")
    return RadGemma3()
