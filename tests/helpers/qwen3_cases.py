"""Named Qwen3-VL input cases for ``tiny-qwen3-vl`` (14 px patches, merge 2, 2-frame temporal patches).

Images are random pixel grids patchified in Qwen's merge-block order; a video of ``t`` slices is written as
transformers' Qwen3VLProcessor writes it: per slice a timestamp (here two text tokens), ``<|vision_start|>``, the
slice's placeholders, ``<|vision_end|>``.
"""

from __future__ import annotations

import torch

from hooked_vlm.families.qwen_vl.preprocess import patchify_image, patchify_video

IMG, VID, VS, VE, PADID = 100, 101, 102, 103, 2


def image_block(h: int, w: int) -> list[int]:
    return [VS] + [IMG] * (h * w // 4) + [VE]


def video_block(t: int, h: int, w: int) -> list[int]:
    out = []
    for f in range(t):
        out += [70 + f, 71, VS] + [VID] * (h * w // 4) + [VE]  # "<f.5 seconds>" as two text tokens
    return out


def make(rows: list[list[int]], images=(), videos=(), side: str = "left") -> dict[str, torch.Tensor]:
    """Padded ids + pixels for image grids ``(h, w)`` and video grids ``(t, h, w)`` (patch counts)."""
    width = max(len(r) for r in rows)

    def pad(r: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(r))
        return fill + r if side == "left" else r + fill

    ids = torch.tensor([pad(r, PADID) for r in rows])
    out = {"input_ids": ids, "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows])}
    if images:
        gen = torch.Generator().manual_seed(0)
        out["pixel_values"] = torch.cat([patchify_image(torch.randn(3, h * 14, w * 14, generator=gen)) for h, w in images])
        out["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images])
    if videos:
        gen = torch.Generator().manual_seed(1)
        out["pixel_values_videos"] = torch.cat([patchify_video(torch.randn(2 * t, 3, h * 14, w * 14, generator=gen))[0] for t, h, w in videos])
        out["video_grid_thw"] = torch.tensor([list(v) for v in videos])
    out["mm_token_type_ids"] = (ids == IMG).long() + 2 * (ids == VID).long()
    return out


CASES = {
    "text": lambda: make([[0, 5, 6, 7, 8, 9]]),
    "image": lambda: make([[0, 5] + image_block(4, 6) + [7, 8, 9]], images=[(4, 6)]),  # 4x6 patches: resampled 4x4 table
    "two_images": lambda: make([[0, 5] + image_block(4, 4) + [6] + image_block(2, 6) + [7, 8]], images=[(4, 4), (2, 6)]),
    "video": lambda: make([[0, 5] + video_block(3, 4, 4) + [7, 8]], videos=[(3, 4, 4)]),
    "image_and_video": lambda: make([[0, 5] + image_block(4, 4) + [6] + video_block(2, 2, 4) + [7, 8]], images=[(4, 4)], videos=[(2, 2, 4)]),
    "padded_left": lambda: make([[0, 5] + image_block(4, 4) + [7], [0, 5, 6, 7] + image_block(2, 2) + list(range(8, 18))], images=[(4, 4), (2, 2)]),
    "padded_right": lambda: make([[0, 5] + image_block(4, 4) + [7], [0, 5, 6, 7] + video_block(2, 2, 2) + [8]], images=[(4, 4)],
                                 videos=[(2, 2, 2)], side="right"),
}
