"""Named LLaVA-family input cases for the tiny models (token counts from the model's geometry)."""

from __future__ import annotations

import torch

from hooked_vlm.families.llava_inputs import image_tokens

IMG, VID, PAD = 100, 101, 2


def px(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def next_tokens(model, size):
    return image_tokens(model.geometry(), size)


def case(family: str, name: str, model) -> dict:
    """Named input cases per family (token counts from the model's geometry, never hard-coded)."""
    if family in ("tiny-llava", "tiny-llava-med", "tiny-llava-dinov2"):
        n = model.geometry().tokens_per_crop
        if name == "image":
            return dict(input_ids=torch.tensor([[0, 5, 6] + [IMG] * n + [7, 8]]), pixel_values=px(1, 3, 56, 56))
        if name == "two_images":
            ids = [0, 5] + [IMG] * n + [6, 7] + [IMG] * n + [8]
            return dict(input_ids=torch.tensor([ids]), pixel_values=px(2, 3, 56, 56, seed=1))
        if name == "batch":
            ids, mask = left_pad([[0, 5] + [IMG] * n + [6, 7, 8, 9], [0, 9] + [IMG] * n + [3]])
            return dict(input_ids=ids, attention_mask=mask, pixel_values=px(2, 3, 56, 56, seed=2))
        if name == "text":
            return dict(input_ids=torch.tensor([[0, 5, 6, 7, 8, 9]]))
    if family == "tiny-llava-next":
        s1, s2 = (30, 50), (60, 20)
        n1, n2 = next_tokens(model, s1), next_tokens(model, s2)
        if name == "image":
            return dict(input_ids=torch.tensor([[0, 5] + [IMG] * n1 + [6, 7]]), pixel_values=px(1, 5, 3, 28, 28),
                        image_sizes=torch.tensor([list(s1)]))
        if name == "two_images":  # different sizes; pixel_values padded to the larger crop count (as the processor)
            ids = [0, 5] + [IMG] * n1 + [6] + [IMG] * n2 + [7]
            pv = px(2, 5, 3, 28, 28, seed=3)
            pv[1, model.geometry().n_crops(s2):] = 0  # the processor pads with zero crops
            return dict(input_ids=torch.tensor([ids]), pixel_values=pv, image_sizes=torch.tensor([list(s1), list(s2)]))
        if name == "batch":
            ids, mask = left_pad([[0, 5] + [IMG] * n1 + [6, 7, 8], [0, 9] + [IMG] * n2 + [3]])
            return dict(input_ids=ids, attention_mask=mask, pixel_values=px(2, 5, 3, 28, 28, seed=4),
                        image_sizes=torch.tensor([list(s1), list(s2)]))
    if family == "tiny-llava-onevision":
        s1 = (40, 30)
        n1 = next_tokens(model, s1)
        nv = model.geometry().video_tokens(4)
        if name == "image":
            return dict(input_ids=torch.tensor([[0, 5] + [IMG] * n1 + [6, 7]]), pixel_values=px(1, 5, 3, 28, 28, seed=5),
                        image_sizes=torch.tensor([list(s1)]))
        if name == "video":
            return dict(input_ids=torch.tensor([[0, 5] + [VID] * nv + [6, 7]]), pixel_values_videos=px(1, 4, 3, 28, 28, seed=6))
        if name == "image_video":
            ids = [0, 5] + [IMG] * n1 + [6] + [VID] * nv + [7]
            return dict(input_ids=torch.tensor([ids]), pixel_values=px(1, 5, 3, 28, 28, seed=7),
                        image_sizes=torch.tensor([list(s1)]), pixel_values_videos=px(1, 4, 3, 28, 28, seed=8))
        if name == "multi_image":  # batch_num_images = [2]: no any-res crops, base + one newline each
            n = model.geometry().tokens_per_crop + 1
            ids = [0, 5] + [IMG] * n + [6] + [IMG] * n + [7]
            return dict(input_ids=torch.tensor([ids]), pixel_values=px(2, 5, 3, 28, 28, seed=9),
                        image_sizes=torch.tensor([[40, 30], [28, 28]]), batch_num_images=torch.tensor([2]))
        if name == "batch":
            ids, mask = left_pad([[0, 5] + [IMG] * n1 + [6, 7], [0, 9] + [VID] * nv + [3, 4, 5, 6]])
            return dict(input_ids=ids, attention_mask=mask, pixel_values=px(1, 5, 3, 28, 28, seed=10),
                        image_sizes=torch.tensor([list(s1)]), pixel_values_videos=px(1, 4, 3, 28, 28, seed=11))
    if family == "tiny-llava-next-video":
        nv = model.geometry().video_tokens(4)
        s1 = (60, 100)
        n1 = next_tokens(model, s1)
        if name == "video":
            return dict(input_ids=torch.tensor([[0, 5] + [VID] * nv + [6, 7]]), pixel_values_videos=px(1, 4, 3, 56, 56, seed=12))
        if name == "image_video":
            ids = [0, 5] + [IMG] * n1 + [6] + [VID] * nv + [7]
            return dict(input_ids=torch.tensor([ids]), pixel_values=px(1, 5, 3, 56, 56, seed=13),
                        image_sizes=torch.tensor([list(s1)]), pixel_values_videos=px(1, 4, 3, 56, 56, seed=14))
        if name == "batch":
            ids, mask = left_pad([[0, 5] + [VID] * nv + [6, 7, 8], [0, 9] + [VID] * nv + [3]])
            return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=px(2, 4, 3, 56, 56, seed=15))
    raise KeyError((family, name))
