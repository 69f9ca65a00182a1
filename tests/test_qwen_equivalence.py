"""Hooked Qwen2-VL / Qwen2.5-VL equal transformers' classes with the same weights (fp32 <= 1e-4)."""

import pytest
import torch

from qwen_cases import QWEN_FAMILIES, CASES, case, hf_logits, mm_types, valid

TOL = 1e-4


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("name", CASES)
def test_logits_match_hf(qwen_pair, family, name):
    hf, model = qwen_pair(family)
    inputs = case(name, family)
    ref = hf_logits(hf, inputs)
    with torch.no_grad():
        ours = model(**inputs)
    assert ours.shape == ref.shape
    diff = (valid(ours, inputs) - valid(ref, inputs)).abs().max().item()
    assert diff <= TOL, f"{family} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_mm_token_type_ids_accepted_and_derived(qwen_pair, family):
    """Passing HF's mm_token_type_ids or omitting it gives the same logits (we derive it from the ids)."""
    _, model = qwen_pair(family)
    inputs = case("image_video", family)
    ids = inputs["input_ids"]
    mm = mm_types(ids)
    with torch.no_grad():
        a = model(**inputs)
        b = model(**inputs, mm_token_type_ids=mm.int())
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_bf16_within_bf16_tolerance(qwen_pair, family):
    from hooked_vlm.loading import from_hf

    hf, _ = qwen_pair(family)
    inputs = case("image", family)
    ref = hf_logits(hf, inputs)
    model16 = from_hf(hf, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = model16(**{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()})
    assert ours.dtype == torch.bfloat16
    diff = (ours.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= 0.05 * scale + 0.02, f"bf16 diff {diff:.3f} vs logit scale {scale:.3f}"


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("name", ["image", "image_video", "batch_left"])
def test_generate_matches_hf(qwen_pair, family, name):
    hf, model = qwen_pair(family)
    inputs = case(name, family)
    ids = inputs["input_ids"]
    mm = mm_types(ids)
    hf.model.rope_deltas = None
    with torch.no_grad():
        ref = hf.generate(**inputs, mm_token_type_ids=mm, max_new_tokens=6, do_sample=False, pad_token_id=2,
                          output_scores=True, return_dict_in_generate=True)
    seen = []
    step_logits = lambda logits, hook: seen.append(logits.detach().clone())  # noqa: E731
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", step_logits)]):
        ours = model.generate(**inputs, max_new_tokens=6)
    assert ours.tolist() == ref.sequences.tolist()
    # one prefill + 5 decode steps fired the final-norm hook, decode steps with one position
    assert len(seen) == 6 and all(s.shape[1] == 1 for s in seen[1:])
    # the scores HF reports for each step equal our logits of that step
    normed = [seen[0][:, -1]] + [s[:, 0] for s in seen[1:]]
    for step, (h, score) in enumerate(zip(normed, ref.scores)):
        ours_logits = model.unembed(model.ln_final.w * h.to(model.ln_final.w.dtype))
        assert (ours_logits - score).abs().max() < 1e-4, f"step {step}"
