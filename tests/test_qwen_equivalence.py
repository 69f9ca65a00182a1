"""Hooked Qwen2-VL / Qwen2.5-VL equal transformers' classes with the same weights.

Tolerances sit near the measured agreement: fp32 logits agree to ~1.1e-6 (max over every case, both families,
default and sensitive configs), so TOL = 2e-5 leaves 20x headroom while an M-RoPE position off by one on one
axis moves the logits by ~4e-3 on the sensitive configs. bf16: measured max |diff| 0.0109 (logit scale ~1.4,
where one bf16 ulp is 2^-7 = 0.0078), bound 0.025 (~2.3x measured).
"""

import pytest
import torch

from qwen_cases import QWEN_FAMILIES, CASES, case, hf_logits, mm_types, valid

TOL = 2e-5
BF16_TOL = 0.025
SENSITIVE_CASES = ["image", "video", "image_video", "batch_left"]


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
@pytest.mark.parametrize("name", SENSITIVE_CASES)
def test_logits_match_hf_where_every_position_axis_matters(sensitive_qwen_pair, family, name):
    """rope_theta 10 and 6 frequencies per M-RoPE section: a one-position error on any axis exceeds TOL 200x."""
    hf, model = sensitive_qwen_pair(family)
    inputs = case(name, family)
    ref = hf_logits(hf, inputs)
    with torch.no_grad():
        ours = model(**inputs)
    diff = (valid(ours, inputs) - valid(ref, inputs)).abs().max().item()
    assert diff <= TOL, f"{family} {name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_mm_token_type_ids_accepted(qwen_pair, family):
    """HF's mm_token_type_ids (int32, as the processor returns them) are accepted and checked against the ids;
    the logits equal the reference computed with them."""
    hf, model = qwen_pair(family)
    inputs = case("image_video", family)
    with torch.no_grad():
        ours = model(**inputs, mm_token_type_ids=mm_types(inputs["input_ids"]).int())
    assert (ours - hf_logits(hf, inputs)).abs().max().item() <= TOL


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
    assert diff <= BF16_TOL, f"bf16 diff {diff:.4f} (bound {BF16_TOL}, measured ~0.011)"


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
        assert (ours_logits - score).abs().max() <= TOL, f"step {step}"
