"""One spatial-relation case: the model's choice (QA option or caption likelihood), attention from the relation
phrase and the answer token to the image per layer, mirror-image activation patching, the last token's residual
stream per layer (for the probes), and accuracy under AdaptVis attention scaling (fixed and confidence-gated)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext
from analyses.pipelines.spatial.adaptvis import gated_factor, key_scaling_hooks
from analyses.pipelines.spatial.data import OPPOSITE, RELATIONS, grid_mask, mirror_image, object_cells, parse_relation
from analyses.pipelines.vlm_cases import answer_ids, cache_path, image_attention_grid, load_image, prompt_inputs, save_npz

__all__ = ["run_case", "Scorer", "ACT_CACHE", "ATTN_CACHE", "PATCH_GROUPS"]

ATTN_CACHE, ACT_CACHE = "attn_cache", "act_cache"
PATCH_GROUPS = ("image", "objects", "last")


@dataclass
class Scorer:
    """Scores of a case's options (QA: the option tokens' logits; captions: summed caption log-likelihoods)."""

    loaded: Any
    prompts: list[str]          # one prompt for QA; one per caption
    option_ids: list[int] | None  # QA only
    device: str

    def inputs(self, image: Any, option: int = 0) -> dict[str, Any]:
        """Inputs of the prompt that states ``option`` (captions), or of the one QA prompt."""
        k = option if self.option_ids is None else 0
        return prompt_inputs(self.loaded, self.prompts[k], [image], self.device)

    def caption_positions(self, inputs: Mapping[str, Any]) -> Tensor:
        """Positions of the caption's text tokens: the text after the image."""
        from hooked_vlm.layout import TEXT

        lay = self.loaded.model.layout(**inputs)
        after = torch.arange(lay.seq_len) > int(lay.positions(image=0).max())
        return ((lay.kind[0] == TEXT) & after).nonzero().flatten()

    def caption_logprob(self, logits: Tensor, positions: Tensor, input_ids: Tensor) -> Tensor:
        """``[B]`` summed log-probability of the tokens at ``positions`` (predicted one step earlier)."""
        lp = logits[:, positions - 1].float().log_softmax(-1)
        return lp.gather(-1, input_ids[:, positions].to(lp.device)[..., None])[..., 0].sum(-1)

    def scores(self, image: Any, hooks_for: Callable[[dict[str, Any]], list] | None = None) -> np.ndarray:
        """Option scores; ``hooks_for(inputs)`` gives forward hooks to run with (AdaptVis)."""
        model = self.loaded.model
        out = []
        for k in range(len(self.prompts)):
            inputs = self.inputs(image, k)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks_for(inputs) if hooks_for else []):
                logits = model(**inputs)
            if self.option_ids is not None:
                return logits[0, -1, self.option_ids].float().numpy()
            out.append(float(self.caption_logprob(logits, self.caption_positions(inputs), inputs["input_ids"])[0]))
        return np.asarray(out)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _object_positions(model: Any, inputs: Mapping[str, Any], cells: list[tuple[int, int]], grid: int, image_size: tuple[int, int]) -> list[int]:
    """Sequence positions of the tokens covering dataset cells ``cells`` (any family's token geometry)."""
    lay = model.layout(**inputs)
    _, item = lay.find_item(image=0)
    h, w = item.pixel_size
    sy, sx = h / image_size[1], w / image_size[0]
    cell_h, cell_w = image_size[1] / grid, image_size[0] / grid
    pos: set[int] = set()
    for r, c in cells:
        box = (r * cell_h * sy, c * cell_w * sx, (r + 1) * cell_h * sy, (c + 1) * cell_w * sx)
        pos.update(lay.box(*box, image=0).tolist())
    return sorted(pos)


def run_case(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    """Everything the spatial reports need from one case (see the module docstring)."""
    opts, model, data = dict(ctx.options), loaded.model, case.data
    image = load_image(case.path("image_path"))
    qa = data.get("caption_options") is None
    text = data["question"] if qa else data["caption_options"][0]
    relation = data.get("relation") or parse_relation(text)[0]
    if qa:
        options = list(data.get("options") or ["yes", "no"])
        prompt = text if "<image>" in text else opts["template"].format(question=text)
        scorer = Scorer(loaded, [prompt], answer_ids(loaded.tokenizer, options), ctx.device)
        gold = options.index(data["answer"])
    else:
        options = list(data["caption_options"])
        scorer = Scorer(loaded, [opts["caption_template"].format(caption=c) for c in options], None, ctx.device)
        gold = 0
    base = scorer.scores(image)
    probs = _softmax(base)
    pred = int(np.argmax(base))
    record: dict[str, Any] = {"form": "qa" if qa else "captions", "relation": relation, "prediction": options[pred],
                              "gold": options[gold], "correct": pred == gold, "confidence": float(probs.max()),
                              "p_gold": float(probs[gold]), "pair_id": _str(data.get("pair_id")), "set_id": _str(data.get("set_id")),
                              "group": _str(data.get("pair_id")) or str(case.path("image_path"))}

    # --- attention from the relation phrase and the answer token, and the residual stream for the probes
    inputs = scorer.inputs(image, gold)
    lay = model.layout(**inputs)
    query: dict[str, Any] = {}
    phrase = next((p for p in RELATIONS[relation] if p in text.lower()), None)
    if phrase is not None:
        try:
            query["relation"] = lay.text_span(phrase, loaded.tokenizer, occurrence=0)
        except ValueError:
            pass
    query["answer"] = [int(lay.last_token()[0])]
    grid = data.get("grid")
    values, names, pooling = image_attention_grid(model, inputs, query, (grid, grid) if grid else None)
    heads_mean = values.mean(1).numpy().astype(np.float32)  # layers QG rows cols
    cells = object_cells(data)
    for qname in ("relation", "answer"):  # the same fields for every case (None where not measurable)
        qi = names.index(qname) if qname in names else None
        record[f"{qname}_image_share"] = None if qi is None else heads_mean[:, qi].sum((-2, -1)).tolist()
        for k in range(2):
            ok = qi is not None and grid and k < len(cells)
            record[f"{qname}_mass_{'ab'[k]}"] = heads_mean[:, qi, cells[k][0], cells[k][1]].tolist() if ok else None
    record["pooling"] = pooling
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_resid_post"))
    resid = np.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1].float().numpy() for l in range(model.cfg.n_layers)])
    save_npz(cache_path(ctx.output_dir, ATTN_CACHE, case.id), attention=values.numpy().astype(np.float32),
             queries=np.array(names), objects=grid_mask(cells, grid) if grid else np.zeros((0, 0), bool))
    save_npz(cache_path(ctx.output_dir, ACT_CACHE, case.id), resid=resid.astype(np.float32))
    record["attn_cache"] = str(cache_path(ctx.output_dir, ATTN_CACHE, case.id).relative_to(ctx.output_dir))
    record["act_cache"] = str(cache_path(ctx.output_dir, ACT_CACHE, case.id).relative_to(ctx.output_dir))
    record["image_path"] = str(case.path("image_path"))

    # --- mirror patching
    record.update(_patching(loaded, scorer, data, case, image, relation, gold, options, inputs, cells, opts))

    # --- AdaptVis: fixed factors, then the confidence-gated factor
    layers = opts.get("adapt_layers")
    fixed = []
    for factor in opts["adapt_factors"]:
        s = scorer.scores(image, lambda inp, f=factor: key_scaling_hooks(model, inp, f, layers))
        fixed.append(bool(int(np.argmax(s)) == gold))
    record["adapt_correct"] = fixed
    g = gated_factor(record["confidence"], opts["gate_threshold"], opts["gate_low"], opts["gate_high"])
    s = scorer.scores(image, lambda inp: key_scaling_hooks(model, inp, g, layers))
    record["gated_factor"], record["gated_correct"] = g, bool(int(np.argmax(s)) == gold)
    return record


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _patching(loaded: Any, scorer: Scorer, data: dict[str, Any], case: Case, image: Any, relation: str, gold: int,
              options: list[str], clean: dict[str, Any], cells: list[tuple[int, int]], opts: dict[str, Any]) -> dict[str, Any]:
    """Patch the clean (original image) residual stream into the mirrored run, per layer and position group."""
    from analyses.metrics import as_metric
    from analyses.patching import activation_patching

    empty = {f"patch_{g}": None for g in PATCH_GROUPS} | {"patch_clean": None, "patch_corrupt": None, "patch_note": ""}
    model = loaded.model
    if data.get("mirror_image_path"):
        mirror = load_image(case.path("mirror_image_path"))
        if mirror.size != image.size:
            raise ValueError(f"mirror image is {mirror.size} px but the image is {image.size}; mirrored pairs must share a size")
    elif relation in OPPOSITE:
        mirror = mirror_image(image, relation)
    else:
        return empty | {"patch_note": f"no mirror counterfactual for relation {relation!r}"}
    corrupt = scorer.inputs(mirror, gold)
    if scorer.option_ids is not None:
        flipped = _flipped_option(options, gold)
        if flipped is None:
            return empty | {"patch_note": f"the mirrored answer to {options[gold]!r} is not known (options {options})"}
        a, b = scorer.option_ids[gold], scorer.option_ids[flipped]
        metric = as_metric(lambda logits: logits[:, -1, a].float() - logits[:, -1, b].float(), name="logit_diff", reads="last")
    else:
        pos = scorer.caption_positions(clean)
        ids = clean["input_ids"]
        metric = as_metric(lambda logits: scorer.caption_logprob(logits, pos, ids), name="caption_logprob")
    lay = model.layout(**clean)
    groups = {"image": lay.positions(image=0).tolist(), "last": [int(lay.last_token()[0])]}
    grid = data.get("grid")
    if cells and grid:
        axis = 1 if relation in ("left", "right") else 0
        mirrored = [tuple(grid - 1 - v if i == axis else v for i, v in enumerate(cell)) for cell in cells]
        groups["objects"] = _object_positions(model, clean, sorted(set(cells) | set(mirrored)), grid, image.size)
    result = activation_patching(model, clean, corrupt, metric, sites=("resid_pre",), positions=groups,
                                 progress=False, batch_size=int(opts.get("patch_batch", 8)))
    values = result.array("resid_pre", "value")  # layers groups
    order = result.group_order.get("resid_pre", list(groups))
    out = {f"patch_{g}": (values[:, order.index(g)].tolist() if g in order else None) for g in PATCH_GROUPS}
    return out | {"patch_clean": result.clean_value, "patch_corrupt": result.corrupt_value, "patch_note": ""}


def _flipped_option(options: list[str], gold: int) -> int | None:
    """The option a mirrored image makes correct: the other of yes / no, or the opposite relation word."""
    word = options[gold].lower()
    swap = {"yes": "no", "no": "yes", **OPPOSITE}
    target = swap.get(word)
    lowered = [o.lower() for o in options]
    return lowered.index(target) if target in lowered else None
