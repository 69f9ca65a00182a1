"""The TransformerLens surface on every decoder family: stacked weights with TL's shapes and semantics, the
neuron / head / full residual decompositions, return types and backward caching, the tokenizer helpers,
unembed hooks, pos_slice with vision hooks, cache and names_filter name checks, input validation, and
cached values that do not depend on which other hooks are cached.

Expected values come from the forward's own hook activations (computed by the projection modules, not the
views under test), from transformers' loss with labels, and from the tiny vocabulary's known ids."""

from __future__ import annotations

import pytest
import torch
from einops import einsum

from hooked_vlm import HookedVLM, InputError, UnsupportedModelError, cli
from hooked_vlm.hook_management import HookNameError
from hooked_vlm.layout import TEXT
from hooked_vlm.samples import synthetic_grid_image
from hooked_vlm.tiny import tiny_hf_model
from hooked_vlm.tiny_tokenizer import tiny_vocab

torch.set_num_threads(1)
FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava", "tiny-llava-next", "tiny-llava-onevision",
            "tiny-llava-next-video", "tiny-gemma3"]
PROMPT = "<image> what color is the circle"
ATOL = 1e-5


@pytest.fixture(scope="module")
def built():
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            model = HookedVLM.from_pretrained(name)
            image, _ = synthetic_grid_image(seed=0, grid=4, num_shapes=3)
            request = cli.InputRequest(model.tokenizer, PROMPT, [image], tiny=True)
            inputs = cli.INPUT_BUILDERS[model.cfg.family](request)
            with torch.no_grad():
                _, cache = model.run_with_cache(**inputs)
            made[name] = (model, inputs, cache)
        return made[name]

    return get


def _post_norm(model, layer: int, which: str):
    """Gemma 3's norm after a sublayer (identity elsewhere): TL's linear views hold before it."""
    norm = getattr(model.blocks[layer], which)
    return norm if norm is not None else (lambda x: x)


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_attention_weights_reproduce_the_projections(built, name):
    model, _, cache = built(name)
    c = model.cfg
    assert model.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert model.W_K.shape == model.W_V.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)  # GQA repeated, as TL
    assert model.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert model.b_Q.shape == model.b_K.shape == (c.n_layers, c.n_heads, c.d_head) and model.b_O.shape == (c.n_layers, c.d_model)
    rep = c.n_heads // c.n_key_value_heads
    for layer in range(c.n_layers):
        x = model.blocks[layer].ln1(cache[f"blocks.{layer}.hook_resid_pre"])  # ln output, weight applied (no folding)
        q = einsum(x, model.W_Q[layer], "b p d, h d e -> b p h e") + model.b_Q[layer]
        torch.testing.assert_close(q, cache[f"blocks.{layer}.attn.hook_q"], atol=ATOL, rtol=0)
        for w, b, hook in ((model.W_K, model.b_K, "hook_k"), (model.W_V, model.b_V, "hook_v")):
            got = einsum(x, w[layer], "b p d, h d e -> b p h e") + b[layer]
            want = cache[f"blocks.{layer}.attn.{hook}"].repeat_interleave(rep, dim=2)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        out = einsum(cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer], "b p h e, h e d -> b p d") + model.b_O[layer]
        torch.testing.assert_close(_post_norm(model, layer, "ln1_post")(out), cache[f"blocks.{layer}.hook_attn_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_mlp_weights_follow_tl_gated_mlp(built, name):
    model, _, cache = built(name)
    c = model.cfg
    assert model.W_in.shape == model.W_gate.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert model.W_out.shape == (c.n_layers, c.d_mlp, c.d_model) and model.b_out.shape == (c.n_layers, c.d_model)
    for layer in range(c.n_layers):
        x = model.blocks[layer].ln2(cache[f"blocks.{layer}.hook_resid_mid"])
        torch.testing.assert_close(x @ model.W_gate[layer], cache[f"blocks.{layer}.mlp.hook_pre"], atol=ATOL, rtol=0)
        torch.testing.assert_close(x @ model.W_in[layer] + model.b_in[layer], cache[f"blocks.{layer}.mlp.hook_pre_linear"], atol=ATOL, rtol=0)
        out = cache[f"blocks.{layer}.mlp.hook_post"] @ model.blocks[layer].mlp.W_out + model.b_out[layer]
        torch.testing.assert_close(_post_norm(model, layer, "ln2_post")(out), cache[f"blocks.{layer}.hook_mlp_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "tiny-gemma3"])
def test_neuron_head_and_full_decompositions_add_up(built, name):
    """TL's stack_neuron_results / get_neuron_results / get_full_resid_decomposition (which need mlp.W_out,
    W_O and accumulated_bias) sum to what the forward wrote (Gemma 3's post-norms make them non-additive)."""
    model, _, cache = built(name)
    last = model.cfg.n_layers - 1
    neurons = cache.get_neuron_results(last, pos_slice=-1)  # [B, d_mlp, d_model]
    torch.testing.assert_close(neurons.sum(-2) + model.b_out[last], cache[f"blocks.{last}.hook_mlp_out"][:, -1], atol=ATOL, rtol=0)
    stacked = cache.stack_neuron_results(layer=model.cfg.n_layers, pos_slice=-1)
    assert stacked.shape[0] == model.cfg.n_layers * model.cfg.d_mlp
    parts = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=True)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{last}.hook_resid_post"][:, -1], atol=1e-4, rtol=0)
    heads = cache.stack_head_results(layer=1, pos_slice=-1)
    torch.testing.assert_close(heads.sum(0) + model.b_O[0], cache["blocks.0.hook_attn_out"][:, -1], atol=ATOL, rtol=0)


def test_gemma3_has_post_norms_so_decomposition_is_not_additive(built):
    """Documented limit: with norms after each sublayer the linear decomposition does not sum to the residual."""
    model, _, cache = built("tiny-gemma3")
    parts = cache.get_full_resid_decomposition(expand_neurons=False)
    last = model.cfg.n_layers - 1
    assert (parts.sum(0) - cache[f"blocks.{last}.hook_resid_post"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_accumulated_bias_and_attn_result(built, name):
    model, inputs, cache = built(name)
    torch.testing.assert_close(model.accumulated_bias(2), model.b_O.sum(0) + model.b_out.sum(0))
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True, include_mlp_biases=False), model.b_O[0] + model.b_O[1])
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, with_result = model.run_with_cache(**inputs, names_filter="blocks.*.attn.hook_result")
    finally:
        model.set_use_attn_result(False)
    assert model.cfg.use_attn_result is False
    for layer in range(model.cfg.n_layers):
        result = with_result[f"blocks.{layer}.attn.hook_result"]
        assert result.shape[2:] == (model.cfg.n_heads, model.cfg.d_model)
        torch.testing.assert_close(result.sum(2) + model.b_O[layer], cache[f"blocks.{layer}.hook_attn_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_unembed_hooks(built, name):
    model, inputs, cache = built(name)
    with torch.no_grad():
        logits = model(**inputs)
    final = model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    torch.testing.assert_close(cache["unembed.hook_in"], final, atol=0, rtol=0)
    torch.testing.assert_close(cache["unembed.hook_out"], logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_matches_transformers_labels_over_text_targets(built, name):
    model, inputs, _ = built(name)
    kind = model.layout(**inputs).kind
    labels = inputs["input_ids"].masked_fill(kind != TEXT, -100)
    hf = tiny_hf_model(name, seed=0)
    with torch.no_grad():
        want = hf(**inputs, labels=labels).loss
        loss = model(**inputs, return_type="loss")
        logits, both_loss = model(**inputs, return_type="both")
        plain = model(**inputs)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)
    assert torch.equal(both_loss, loss) and torch.equal(logits, plain)
    assert model(**inputs, return_type=None) is None


def test_bad_return_type_is_named(built):
    model, inputs, _ = built("tiny-qwen2-vl")
    with pytest.raises(ValueError, match=r"return_type must be one of \['logits', 'loss', 'both', 'resid', None\], got 'bogus'"):
        model(**inputs, return_type="bogus")


def test_incl_bwd_caches_the_gradients_of_the_loss(built):
    model, inputs, _ = built("tiny-qwen2.5-vl")
    names = ["blocks.0.hook_resid_post", "vision.hook_out"]
    loss, cache = model.run_with_cache(**inputs, return_type="loss", incl_bwd=True, names_filter=names)
    model.zero_grad(set_to_none=True)
    kept = {}

    def keep(t, hook):
        t.retain_grad()
        kept[hook.name] = t

    expected = model.run_with_hooks(**inputs, return_type="loss", fwd_hooks=[(n, keep) for n in names])
    expected.backward()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss.detach(), expected.detach())
    for n in names:
        torch.testing.assert_close(cache[n + "_grad"], kept[n].grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must be a scalar: pass return_type='loss'"):
        model.run_with_cache(**inputs, incl_bwd=True)


def test_tokenizer_helpers_use_the_attached_tokenizer(built):
    model, _, _ = built("tiny-qwen2-vl")
    vocab = tiny_vocab()
    ids = [vocab["<bos>"], vocab["what"], vocab["color"], vocab["is"]]
    assert model.to_tokens("what color is").tolist() == [ids]
    assert model.to_tokens("what color is", prepend_bos=False).tolist() == [ids[1:]]
    assert model.to_str_tokens("what color is") == ["<bos>", "what", "color", "is"]
    assert model.to_string(torch.tensor(ids[1:])) == "what color is"
    assert model.to_single_token("circle") == vocab["circle"]
    batch = model.to_tokens(["what", "what color"], padding_side="left")
    assert batch.tolist() == [[vocab["<pad>"], ids[0], ids[1]], [ids[0], ids[1], ids[2]]]
    bare = HookedVLM.from_hf(tiny_hf_model("tiny-qwen2-vl", seed=0))
    with pytest.raises(ValueError, match=r"no tokenizer: attach one with model.set_tokenizer"):
        bare.to_tokens("what")
    bare.set_tokenizer(model.tokenizer)
    assert bare.to_str_tokens(torch.tensor([ids])) == ["<bos>", "what", "color", "is"]


def test_from_pretrained_builtin_equals_tiny_model_and_carries_tokenizer():
    from hooked_vlm.tiny import tiny_model

    model = HookedVLM.from_pretrained("tiny-qwen2.5-vl", seed=3)
    reference = tiny_model("tiny-qwen2.5-vl", seed=3)
    assert model.tokenizer is not None and model.tokenizer.convert_tokens_to_ids("circle") == tiny_vocab()["circle"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(FileNotFoundError, match=r"no built-in model 'tiny-qwen9'; built-in: .*tiny-qwen2.5-vl"):
        HookedVLM.from_pretrained("tiny-qwen9")


def test_pos_slice_cuts_positions_not_heads_or_patches(built):
    model, inputs, cache = built("tiny-qwen2.5-vl")
    names = ["vision.hook_out", "vision.blocks.0.hook_resid_post", "blocks.0.hook_resid_post", "blocks.0.attn.hook_rot_q",
             "blocks.0.attn.hook_pattern", "blocks.1.ln1.hook_scale"]
    with torch.no_grad():
        _, sliced = model.run_with_cache(**inputs, names_filter=names, pos_slice=-1)
    assert torch.equal(sliced["vision.hook_out"], cache["vision.hook_out"])
    assert torch.equal(sliced["vision.blocks.0.hook_resid_post"], cache["vision.blocks.0.hook_resid_post"])
    # TransformerLens's Slice keeps the sliced axis (length 1) when caching
    assert torch.equal(sliced["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][:, -1:])
    assert torch.equal(sliced["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_rot_q"][:, -1:])  # TL's rule would cut heads
    torch.testing.assert_close(sliced["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_pattern"][:, :, -1:], atol=0, rtol=0)
    assert torch.equal(sliced["blocks.1.ln1.hook_scale"], cache["blocks.1.ln1.hook_scale"][:, -1:])


def test_cache_key_typos_and_uncached_names_are_explained(built):
    model, inputs, _ = built("tiny-qwen2-vl")
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="blocks.*.hook_resid_post")
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_pots is not a cached hook\. Closest hook names: \['blocks\.1\.hook_resid_post'"):
        cache["blocks.1.hook_resid_pots"]
    with pytest.raises(KeyError, match=r"'blocks\.0\.hook_mlp_out' is a hook point but was not cached: add it to names_filter"):
        cache["blocks.0.hook_mlp_out"]
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])  # TL's short keys still work


def test_names_filter_globs_match_the_cli(built):
    model, inputs, _ = built("tiny-qwen2.5-vl")
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=["blocks.*.hook_resid_post", "vision.blocks.[01].attn.hook_q"])
    assert sorted(cache.keys()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                    "vision.blocks.0.attn.hook_q", "vision.blocks.1.attn.hook_q"]
    assert cli.select_hooks(["blocks.*.hook_resid_post", "vision.blocks.[01].attn.hook_q"], list(model.hook_dict)) == list(cache.keys())
    with pytest.raises(HookNameError, match=r"No hook matches 'blocks\.\*\.hook_resid_pots'\. Closest: blocks\.\d\.hook_resid_post"):
        model.run_with_cache(**inputs, names_filter="blocks.*.hook_resid_pots")


def test_two_tower_models_share_globs_cache_hints_and_tokenizer():
    model = HookedVLM.from_pretrained("tiny-clip")
    ids = torch.tensor([[0, 5, 6, 1]])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids=ids, pixel_values=pixels, names_filter="vision.blocks.*.hook_resid_post")
    assert sorted(cache.keys()) == ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"]
    with pytest.raises(HookNameError, match="Closest cached names"):
        cache["vision.blocks.1.hook_resid_pots"]
    assert model.tokenizer.convert_tokens_to_ids("circle") == tiny_vocab()["circle"]


def test_generate_and_forward_validate_their_arguments(built):
    model, inputs, _ = built("tiny-qwen2-vl")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_new_tokens must be a positive integer \(tokens to generate\), got {bad!r}"):
            model.generate(max_new_tokens=bad, **inputs)
    with pytest.raises(TypeError, match=r"generate got a dict as a positional argument; unpack the keyword tensors: model.generate\(\*\*inputs\)"):
        model.generate(inputs)
    with pytest.raises(TypeError, match=r"forward got a dict as a positional argument; unpack the keyword tensors: model\(\*\*inputs\)"):
        model(inputs)
    with pytest.raises(InputError, match=r"input_ids \(1, 0\) holds no tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))
    assert model.generate(max_new_tokens=1, **inputs).shape[1] == inputs["input_ids"].shape[1] + 1


def test_from_hf_of_a_non_model_names_what_it_expected():
    with pytest.raises(UnsupportedModelError, match=r"from_hf expects an in-memory transformers model .* got torch\.nn\.modules\.linear\.Linear"):
        HookedVLM.from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_values_do_not_depend_on_caching_patterns(built, name):
    """Caching patterns switches a layer to the explicit path; unless a hook edits the pattern, its output is the
    fast path's bit for bit (fp32), so every other cached value and the logits are identical."""
    model, inputs, _ = built(name)
    resid = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)] + ["blocks.0.attn.hook_z"]

    def halve_in_place(pattern, hook):
        pattern.mul_(0.5)  # returns nothing: TransformerLens keeps the (edited) tensor
    with torch.no_grad():
        plain_logits, plain = model.run_with_cache(**inputs, names_filter=resid)
        pattern_logits, with_pattern = model.run_with_cache(**inputs, names_filter=resid + ["blocks.*.attn.hook_pattern", "vision.blocks.*.attn.hook_pattern"])
        halved = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5)])
        in_place = model.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_pattern", halve_in_place)])
    assert torch.equal(plain_logits, pattern_logits)
    for n in resid:
        assert torch.equal(plain[n], with_pattern[n]), n
    assert not torch.allclose(halved, plain_logits, atol=1e-4)  # an edit still takes effect ...
    torch.testing.assert_close(in_place, halved, atol=1e-6, rtol=0)  # ... also when made in place


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-gemma3"])
def test_pattern_gradients_flow_while_values_stay_bit_identical(built, name):
    """With autograd on, a cached (unedited) pattern still carries TransformerLens's gradient: dL/dpattern equals
    grad(hook_z) . v written out by hand, and the input gradient equals the run without pattern hooks."""
    model, inputs, _ = built(name)
    layer = 0
    attn = model.blocks[layer].attn
    kept: dict[str, torch.Tensor] = {}

    def keep(key):
        def fn(t, hook):
            t.retain_grad()
            kept[key] = t
            return t
        return fn

    def embed_grad(extra_hooks):
        hooks = [("hook_embed", keep("embed")), (f"blocks.{layer}.attn.hook_z", keep("z")),
                 (f"blocks.{layer}.attn.hook_v", keep("v"))] + extra_hooks
        logits = model.run_with_hooks(**inputs, fwd_hooks=hooks)
        logits[:, -1].logsumexp(-1).sum().backward()
        return logits.detach(), kept["embed"].grad.clone()

    plain_logits, plain_grad = embed_grad([])
    pattern_logits, pattern_grad = embed_grad([(f"blocks.{layer}.attn.hook_pattern", keep("pattern"))])
    assert torch.equal(plain_logits, pattern_logits)
    torch.testing.assert_close(pattern_grad, plain_grad, atol=1e-6, rtol=1e-5)
    v = kept["v"].detach().repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)  # B K H dh, per query head
    want = einsum(kept["z"].grad, v, "b q h d, b k h d -> b h q k")
    torch.testing.assert_close(kept["pattern"].grad, want, atol=1e-6, rtol=1e-5)
    assert want.abs().max() > 1e-3  # the gradient is not trivially zero
