"""Analyses and the nnsight layer name no family's input keys, family modules or private model methods: they read
``model.input_schema()`` / ``model.layout(...)`` instead (issue 10, "Done when"). Docstrings and comments may name
keys; every other hit must be one of the listed, explained exceptions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "analyses", ROOT / "hooked_vlm" / "nnsight_ext"]
FORBIDDEN = re.compile(
    r"pixel_values|image_grid_thw|image_sizes|mm_token_type_ids|llava_inputs|qwen_inputs|\._prepare\b|hasattr\(attn"
)

#: (file relative to the repo, stripped source line): code hits that are allowed, with the reason.
ALLOWED = {
    # the error tells the user how to call; it names an example keyword, it does not read one
    ("hooked_vlm/nnsight_ext/envoy.py",
     'raise TypeError("pass inputs as keywords (input_ids=..., pixel_values=...) when batching invokes")'),
    # CLIP / SigLIP-only logit-lens helpers: a public parameter named after the two-tower input
    ("analyses/logit_lens.py", 'model: Any, pixel_values: Float[Tensor, "images 3 H W"], label_input_ids: Int[Tensor, "labels pos"],'),
    ("analyses/logit_lens.py", "_, cache = model.run_with_cache(pixel_values=pixel_values, names_filter=lambda n: n in {names[l] for l in layers})"),
    ("analyses/logit_lens.py", "grid = (pixel_values.shape[-2] // ps, pixel_values.shape[-1] // ps)"),
    ("analyses/logit_lens.py", 'model: Any, input_ids: Int[Tensor, "texts pos"], pixel_values: Float[Tensor, "images 3 H W"],'),
    ("analyses/logit_lens.py", "img_emb = model.encode_image(pixel_values)"),
}


def _prose_lines(source: str) -> set[int]:
    """Line numbers inside docstrings (module, class, function)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def family_key_hits(files: list[Path], root: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, text) of each code line (not docstring, not comment) that names a family key or private method."""
    hits = []
    for path in files:
        source = path.read_text()
        prose = _prose_lines(source)
        for no, line in enumerate(source.splitlines(), 1):
            if no not in prose and FORBIDDEN.search(line.split("#", 1)[0]):
                hits.append((str(path.relative_to(root)), no, line.strip()))
    return hits


def test_the_scan_finds_a_planted_key_and_ignores_prose(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('"""Docs may say pixel_values."""\n\n\ndef g(inputs):\n    """image_sizes too."""\n'
                 '    # and comments: image_grid_thw\n    return inputs["pixel_values"], model._prepare(inputs)\n')
    assert family_key_hits([f], tmp_path) == [("x.py", 7, 'return inputs["pixel_values"], model._prepare(inputs)')]


def test_analyses_and_nnsight_name_no_family_input_keys_or_private_methods():
    files = sorted(p for d in SCANNED for p in d.rglob("*.py"))
    hits = [(f, no, text) for f, no, text in family_key_hits(files) if (f, text) not in ALLOWED]
    assert not hits, (
        "read input names from model.input_schema() (pixels, pixel_input(kind), structure, ...) or the layout "
        f"(layout.pixel_input(kind)) instead of naming them: {hits}"
    )


def test_every_allowed_exception_still_exists():
    files = sorted(p for d in SCANNED for p in d.rglob("*.py"))
    found = {(f, text) for f, _, text in family_key_hits(files)}
    assert ALLOWED <= found, f"remove fixed exceptions from ALLOWED: {sorted(ALLOWED - found)}"


def test_the_schema_maps_item_kinds_to_pixel_inputs_for_every_family():
    from hooked_vlm.families.registry import families

    for fam in families():
        schema = fam.input_schema
        assert schema.pixel_kinds, fam.name
        assert {name for _, name in schema.pixel_kinds} == set(schema.pixels), fam.name
        for kind, name in schema.pixel_kinds:
            assert schema.pixel_input(kind) == name and schema.pixel_kind(name) == kind


def test_a_layout_names_the_pixel_input_of_its_items():
    import pytest

    from hooked_vlm import tiny
    from hooked_vlm.layout import TokenLayout

    model = tiny.tiny_model("tiny-qwen2-vl")
    ids = torch.tensor([[1, 2, 3]])
    lay = model.layout(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert lay.pixel_input("image") == "pixel_values" and lay.pixel_input("video") == "pixel_values_videos"
    bare = TokenLayout(ids, ids, ids, ids, ids, ids, [])
    with pytest.raises(ValueError, match="build it with model.layout"):
        bare.pixel_input("image")
