"""Every shipped organism runs through `hooked-vlm inspect --model NAME` with its own processor geometry."""

from __future__ import annotations

import io
import re

import pytest

from hooked_vlm import cli

# image tokens per picture, from each checkpoint's geometry (Qwen 280 px / 28 px cells, DINOv2 112 / 14, Gemma 3 pooled 16)
IMAGE_TOKENS = {"grid-qwen2.5-vl": 100, "video-qwen2-vl": 100, "rad-llava": 64, "rad-gemma3": 16}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMAGE_TOKENS))
def test_inspect_runs_each_decoder_organism_with_its_image_geometry(name):
    out = io.StringIO()
    assert cli.main(["inspect", "--model", name, "--image", "synthetic", "--hook-table", "none", "--quiet"], stdout=out) == 0
    spans = [(int(a), int(b)) for a, b in re.findall(r"\[\s*(\d+),\s*(\d+)\) image ", out.getvalue())]
    assert [b - a for a, b in spans] == [IMAGE_TOKENS[name]]


def test_inspect_runs_the_clip_organism():
    out = io.StringIO()
    assert cli.main(["inspect", "--model", "shapes-clip", "--image", "synthetic", "--hook-table", "none", "--quiet"], stdout=out) == 0
    assert re.search(r"image_embeds\s+\[1, 32\]\s+norms \[1\.0\]", out.getvalue())
