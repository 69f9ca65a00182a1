"""Hand-built Qwen inputs for the tiny models (vocabulary of hooked_vlm.tiny), shared by several tests."""

from __future__ import annotations

import torch

IMG, VID, VS, VE, PAD = 100, 101, 102, 103, 2
QWEN_FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def patchify_frames(frames: torch.Tensor, patch: int = 14, merge: int = 2, tps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [T, C, H, W] (already normalised) -> (pixel rows in HF merge-block order, grid_thw [1, 3]).

    T is padded to a multiple of ``tps`` by repeating the last frame, as the Qwen video processor does.
    """
    t = frames.shape[0]
    if t % tps:
        frames = torch.cat([frames, frames[-1:].expand(tps - t % tps, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // tps, h // patch, w // patch
    x = frames.reshape(gt, tps, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tps * patch * patch)
    return x, torch.tensor([[gt, gh, gw]])


def image_rows(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return patchify_frames(torch.randn(1, 3, h, w, generator=g))


def tokens(grid: torch.Tensor) -> int:
    t, h, w = grid[0].tolist()
    return t * h * w // 4


def case(name: str, family: str) -> dict[str, torch.Tensor]:
    """The named input case of the foundation issue's equivalence list."""
    if name == "text":
        return dict(input_ids=torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11]]))
    if name == "image":
        pv, g = image_rows(112, 168)
        ids = [0, 5, 6, 7, VS] + [IMG] * tokens(g) + [VE, 8, 9, 10]
        return dict(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=g)
    if name == "two_images":
        pv1, g1 = image_rows(112, 168, 1)
        pv2, g2 = image_rows(56, 84, 2)
        ids = [0, 5, VS] + [IMG] * tokens(g1) + [VE, 7, VS] + [IMG] * tokens(g2) + [VE, 9]
        return dict(input_ids=torch.tensor([ids]), pixel_values=torch.cat([pv1, pv2]), image_grid_thw=torch.cat([g1, g2]))
    if name == "video":  # 5 frames (odd): padded to 6 -> 3 temporal slices
        frames = torch.randn(5, 3, 56, 84, generator=torch.Generator().manual_seed(3))
        pvv, g = patchify_frames(frames)
        ids = [0, 5, VS] + [VID] * tokens(g) + [VE, 7, 8]
        out = dict(input_ids=torch.tensor([ids]), pixel_values_videos=pvv, video_grid_thw=g)
        if family == "tiny-qwen2.5-vl":
            out["second_per_grid_ts"] = torch.tensor([1.0])
        return out
    if name == "image_video":
        img, vid = case("image", family), case("video", family)
        ids = img["input_ids"][0].tolist()[:-1] + vid["input_ids"][0].tolist()[1:]
        out = dict(img)
        out.update({k: v for k, v in vid.items() if k != "input_ids"})
        out["input_ids"] = torch.tensor([ids])
        return out
    if name in ("batch_left", "batch_right"):
        pv1, g1 = image_rows(112, 168, 4)
        pv2, g2 = image_rows(56, 56, 5)
        a = [0, 5, VS] + [IMG] * tokens(g1) + [VE, 7, 8]
        b = [0, 6, VS] + [IMG] * tokens(g2) + [VE, 9]
        pad = len(a) - len(b)
        if name == "batch_left":
            b_ids, b_mask = [PAD] * pad + b, [0] * pad + [1] * len(b)
        else:
            b_ids, b_mask = b + [PAD] * pad, [1] * len(b) + [0] * pad
        return dict(
            input_ids=torch.tensor([a, b_ids]),
            attention_mask=torch.tensor([[1] * len(a), b_mask]),
            pixel_values=torch.cat([pv1, pv2]),
            image_grid_thw=torch.cat([g1, g2]),
        )
    raise KeyError(name)


CASES = ["text", "image", "two_images", "video", "image_video", "batch_left", "batch_right"]


def mm_types(ids: torch.Tensor) -> torch.Tensor:
    """HF's mm_token_type_ids for the tiny vocabulary: 1 at image, 2 at video placeholders."""
    mm = torch.zeros_like(ids)
    mm[ids == IMG] = 1
    mm[ids == VID] = 2
    return mm


def hf_logits(hf, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference logits: adds mm_token_type_ids and clears HF's cached rope deltas first."""
    mm = mm_types(inputs["input_ids"])
    hf.model.rope_deltas = None
    with torch.no_grad():
        return hf(**inputs, mm_token_type_ids=mm).logits


def valid(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at non-padding positions only (padding logits are undefined in both implementations)."""
    am = inputs.get("attention_mask")
    return logits if am is None else logits[am.bool()]
