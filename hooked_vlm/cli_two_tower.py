"""``hooked-vlm inspect`` for CLIP / SigLIP: image and text embeddings and their similarities.

Texts come from ``--text`` (repeatable; ``--prompt`` counts as one), else one caption per shape of the
synthetic image. Pixels: transformers' PIL image processor of the family at the tower's image size, with
the checkpoint's ``preprocessor_config.json`` settings when it has one. Texts: CLIP pads to the longest text with an attention mask;
SigLIP pads to its position count without one (as its processor does).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, TextIO

from hooked_vlm.families.clip.preprocess import pixel_inputs  # noqa: F401  (also importable from here, as before)

def default_texts(descriptions: list[dict[str, Any]]) -> list[str]:
    """One caption per annotated shape of the first synthetic image (at most 4), else two generic ones."""
    for d in descriptions:
        if d.get("annotations"):
            seen: list[str] = []
            for a in d["annotations"]:
                caption = f"a {a['color']} {a['shape']}"
                if caption not in seen:
                    seen.append(caption)
            return seen[:4]
    return ["a red circle", "a blue square"]


def text_inputs(texts: list[str], tokenizer: Any, model: Any) -> dict[str, Any]:
    """``input_ids`` (and for CLIP ``attention_mask``) of the texts, padded as the family's processor pads."""
    import torch

    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids = [row if row[-1:] == [eos] else row + [eos] for row in ids]  # CLIP pools its first EOS, SigLIP its last token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    text_cfg = model.cfg.hf_config.get("text_config", model.cfg.hf_config)
    limit = int(text_cfg.get("max_position_embeddings", 77))
    if any(len(row) > limit for row in ids):
        raise ValueError(f"a text is longer than the text tower's {limit} positions; shorten it")
    width = limit if model.cfg.family == "siglip" else max(len(row) for row in ids)
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    if model.cfg.family == "siglip":
        return {"input_ids": input_ids}
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def run_two_tower(args: argparse.Namespace, loaded: Any, sources: Any, hooks: list[str], stdout: TextIO, started: float) -> int:
    """Embed the images and texts, print similarities, save the cached hooks and a manifest."""
    import torch

    from hooked_vlm import cli

    model = loaded.model
    if sources.videos:
        raise ValueError(f"{model.cfg.architecture} takes images and texts, not videos; drop --video")
    texts = list(args.text) + ([args.prompt] if args.prompt else [])
    texts = texts or default_texts(sources.descriptions)
    inputs: dict[str, Any] = {}
    if sources.images and model.vision is not None:
        inputs["pixel_values"] = pixel_inputs(sources.images, model, loaded.checkpoint).to(args.device, cli._dtype(args.dtype))
    if model.text is not None:
        inputs.update({k: v.to(args.device) for k, v in text_inputs(texts, loaded.tokenizer, model).items()})
    if not inputs:
        raise ValueError(f"{model.cfg.architecture} needs an image (--image) for its vision tower")
    with torch.no_grad():
        out, cache = model.run_with_cache(**inputs, names_filter=hooks)
    activations = {name: cache[name] for name in hooks if name in cache.cache_dict}
    cli._note_silent_hooks(hooks, activations)
    image_embeds = getattr(out, "image_embeds", None)
    text_embeds = getattr(out, "text_embeds", None)
    per_image = getattr(out, "logits_per_image", None)

    cli._print_header(stdout, loaded, sources)
    print("texts    " + "; ".join(repr(t) for t in texts), file=stdout)
    print("inputs   " + ", ".join(f"{k} {list(v.shape)}" for k, v in cli._tensor_items(inputs)), file=stdout)
    similarity = None
    if per_image is not None:
        probs = per_image.float().softmax(-1) if model.cfg.family == "clip" else per_image.float().sigmoid()
        kind = "softmax over texts" if model.cfg.family == "clip" else "sigmoid per pair"
        print(f"\nImage-text similarity (logit; probability: {kind})", file=stdout)
        rows = [[i, t, texts[t], f"{float(per_image[i, t]):.4f}", f"{float(probs[i, t]):.4f}"]
                for i in range(per_image.shape[0]) for t in range(per_image.shape[1])]
        print(cli.format_table(["image", "text", "caption", "logit", "prob"], rows), file=stdout)
        similarity = {"logits_per_image": per_image.float().tolist(), "probs": probs.tolist(), "texts": texts}
    print("\nEmbeddings", file=stdout)
    for name, emb in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if emb is not None:
            print(f"  {name:<13} {list(emb.shape)}  norms {[round(float(n), 4) for n in emb.float().norm(dim=-1)]}", file=stdout)
    shapes = {name: tuple(t.shape) for name, t in activations.items()}
    cli._print_hook_table(stdout, args, loaded, shapes)
    if args.out is not None:
        manifest = {
            "format": cli.MANIFEST_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "hooked-vlm " + " ".join(args.argv),
            "model": cli.model_record(args, loaded),
            "inputs": {"texts": texts, "sources": sources.descriptions,
                       "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in cli._tensor_items(inputs)},
                       "input_ids": inputs["input_ids"].tolist() if "input_ids" in inputs else None},
            "hooks": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in activations.items()],
            "similarity": similarity,
            "layout": None,
        }
        target = cli.write_activations(Path(args.out), activations, manifest)
        print(f"\nwrote {len(activations)} activation(s) to {args.out} and the manifest to {target}", file=stdout)
    print(f"done in {time.perf_counter() - started:.2f} s", file=stdout)
    return 0
