"""``shapes-clip`` + ``phi``: a CLIP trained contrastively on shapes and captions, and a SEARLE-style phi for
zero-shot composed image retrieval ("a photo of $ that is blue").

Images are ``SIZE`` px: one coloured shape (circle / square / triangle / cross x red / green / blue / yellow /
purple) in one of five places (top left, top right, bottom left, bottom right, center) on a light
background, with jittered size and offset. Captions name the three attributes ("a red circle top left",
"a photo of a red circle top left"); a third of the training captions carry a colour *modifier* that
overrides the first colour word ("a photo of a green circle top left that is red" describes a red circle):
the caption language itself teaches the text tower that "that is COLOR" wins, which is the rule composed
queries rely on.

``phi`` (SEARLE's textual-inversion network) maps an image embedding to ONE input embedding of the text
tower: the pseudo-word ``$`` (token ``<$>``). It is trained with CLIP frozen so that the text embedding of
"a photo of $" matches the image's embedding (InfoNCE over the batch, SEARLE's objective without its
GPT-phrase regulariser). A composed query is "a photo of $ that is blue" with ``$ = phi(reference)``.

Planted truth: every image's colour, shape and place (``example.truth``); the retrieval database holds one
image per attribute combination, so the right answer of each (composed) query is exactly one image.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Int
from PIL import Image, ImageDraw
from torch import Tensor, nn

from hooked_vlm.organisms.base import EVAL_SEED, Example, Organism, TaskAccuracy, TrainResult, _checked_dir, training_stream

__all__ = [
    "SIZE", "COLORS", "SHAPES", "PLACES", "PSEUDO_TOKEN", "ShapesClip", "Phi", "organism", "render", "caption",
    "combos", "load_phi", "pseudo_word_embeds", "compose_text_embeds", "recall_at",
]

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (235, 200, 20), "purple": (140, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: place -> centre (x, y) as a fraction of the image side
PLACES: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
PSEUDO_TOKEN = "<$>"
BACKGROUND = (235, 235, 235)
#: phi lives in a ``phi/`` subfolder: a second *.safetensors beside model.safetensors would be read as CLIP weights
PHI_DIR, PHI_FILE, PHI_CONFIG = "phi", "model.safetensors", "config.json"

Combo = tuple[str, str, str]  # (color, shape, place)


def combos() -> list[Combo]:
    """All 100 (color, shape, place) combinations, in a fixed order (the database order)."""
    return list(product(COLORS, SHAPES, PLACES))


def render(color: str, shape: str, place: str, rng: np.random.Generator) -> np.ndarray:
    """The ``SIZE`` px RGB uint8 image of one shape (size and offset jittered by ``rng``)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fx, fy = PLACES[place]
    half = float(rng.uniform(0.14, 0.19)) * SIZE
    cx = fx * SIZE + float(rng.uniform(-3, 3))
    cy = fy * SIZE + float(rng.uniform(-3, 3))
    box = (cx - half, cy - half, cx + half, cy + half)
    rgb = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * half, cy - 0.85 * half, cx + 0.85 * half, cy + 0.85 * half), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=rgb)
    elif shape == "cross":
        t = half / 3
        draw.rectangle((cx - half, cy - t, cx + half, cy + t), fill=rgb)
        draw.rectangle((cx - t, cy - half, cx + t, cy + half), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")
    return np.asarray(image, dtype=np.uint8)


def caption(color: str, shape: str, place: str, style: int = 0, decoy: str | None = None) -> str:
    """A caption of the combination. style 0: "a red circle top left"; 1: "a photo of a red circle top left";
    2: with the modifier, "a photo of a DECOY circle top left that is red" (the modifier's colour wins)."""
    if style == 0:
        return f"a {color} {shape} {place}"
    if style == 1:
        return f"a photo of a {color} {shape} {place}"
    if style == 2:
        return f"a photo of a {decoy} {shape} {place} that is {color}"
    raise ValueError(f"caption style must be 0, 1 or 2, got {style}")


def composed_query(new_color: str) -> str:
    """The composed-retrieval text: the pseudo-word stands for the reference image."""
    return f"a photo of {PSEUDO_TOKEN} that is {new_color}"


class Phi(nn.Module):
    """SEARLE's phi: image embedding -> one pseudo-word input embedding of the text tower (a 3-layer GELU MLP)."""

    def __init__(self, d_image: int, d_hidden: int, d_word: int):
        super().__init__()
        self.config = {"d_image": d_image, "d_hidden": d_hidden, "d_word": d_word}
        self.net = nn.Sequential(nn.Linear(d_image, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden), nn.GELU(),
                                 nn.Linear(d_hidden, d_word))

    def forward(self, image_embeds: Float[Tensor, "n d_image"]) -> Float[Tensor, "n d_word"]:
        return self.net(nn.functional.normalize(image_embeds, dim=-1))


def load_phi(model_dir: str | Path) -> Phi:
    """The phi saved beside a shapes-clip checkpoint (safetensors + phi_config.json), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(model_dir) / PHI_DIR
    cfg_file = folder / PHI_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no {PHI_DIR}/{PHI_CONFIG}; it is not a shapes-clip checkpoint with its phi "
                                "(train one with `hooked-vlm organisms train shapes-clip`)")
    phi = Phi(**json.loads(cfg_file.read_text()))
    phi.load_state_dict(load_file(str(folder / PHI_FILE)))
    return phi.eval()


def pseudo_word_embeds(token_embeds: Float[Tensor, "n pos d"], input_ids: Int[Tensor, "n pos"], pseudo_id: int,
                       words: Float[Tensor, "n d"]) -> Float[Tensor, "n pos d"]:
    """``token_embeds`` of ``input_ids`` with each row's pseudo-word position replaced by ``words[row]`` (works as
    a transformers forward hook on the token embedding and as a hooked_vlm hook on ``text.hook_token_embed``)."""
    at = input_ids == pseudo_id
    if not bool((at.sum(-1) == 1).all()):
        raise ValueError(f"every text must hold the pseudo-word {PSEUDO_TOKEN} exactly once; counts {at.sum(-1).tolist()}")
    return torch.where(at[..., None], words[:, None, :].to(token_embeds.dtype), token_embeds)


def compose_text_embeds(clip: nn.Module, input_ids: Int[Tensor, "n pos"], attention_mask: Tensor, pseudo_id: int,
                        words: Float[Tensor, "n d"]) -> Float[Tensor, "n proj"]:
    """transformers ``CLIPModel`` text embeddings with the pseudo-word's input embedding set to ``words``
    (a forward hook on the token embedding, so the rest of the text tower runs unchanged)."""
    token_embedding = clip.text_model.embeddings.token_embedding

    def replace(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return pseudo_word_embeds(out, args[0], pseudo_id, words)

    handle = token_embedding.register_forward_hook(replace)
    try:
        return clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    finally:
        handle.remove()


def recall_at(scores: Float[Tensor, "queries database"], targets: Int[Tensor, "queries"], k: int) -> Tensor:
    """``[queries]`` bool: the target's rank is < k (ties count against the target)."""
    target_score = scores.gather(1, targets[:, None])
    rank = (scores >= target_score).sum(-1) - 1
    return rank < k


@dataclass
class ClipBatch:
    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor


class ShapesClip(Organism):
    name: ClassVar[str] = "shapes-clip"
    family: ClassVar[str] = "clip"
    architecture: ClassVar[str] = "CLIPModel"
    tasks: ClassVar[tuple[str, ...]] = ("retrieval_r1", "retrieval_r5", "composed_r1", "composed_r5")
    target_accuracy: ClassVar[float] = 0.90
    default_steps: ClassVar[int] = 800
    phi_steps: ClassVar[int] = 400
    batch_size: ClassVar[int] = 64
    lr: ClassVar[float] = 2e-3
    summary: ClassVar[str] = (
        "Composed image retrieval. 64 px images of one shape (circle / square / triangle / cross x red / green / blue / "
        "yellow / purple) in one of five places (top left / top right / bottom left / bottom right / center); captions "
        "\"a red circle top left\", \"a photo of a red circle top left\" and, for a third of the training captions, "
        "\"a photo of a green circle top left that is red\" (the colour after `that is` wins). A transformers "
        "`CLIPModel` (ViT with 16 px patches: 4x4 + [CLS], causal text tower, projection 32) trained with the CLIP loss; then a SEARLE "
        "phi (MLP, image embedding -> one pseudo-word input embedding, `phi/model.safetensors`) trained with CLIP frozen so "
        "that \"a photo of $\" embeds like the image. Composed query: \"a photo of $ that is blue\" with $ = phi(reference)."
    )
    planted_truth: ClassVar[str] = (
        "Every image's colour, shape and place (`example.truth`). The held-out database holds one freshly drawn image "
        "per combination (100), so each text query (`retrieval_*`: caption -> image) and each composed query "
        "(`composed_*`: reference of a combination + \"that is NEW_COLOUR\" -> the database image with the colour "
        "changed and shape and place kept) has exactly one right answer. Recall@1 and @5 are reported as accuracies."
    )

    # ----- data -------------------------------------------------------------------------------------------
    def words(self) -> list[str]:
        places = {w for p in PLACES for w in p.split()}
        return sorted(set(COLORS) | set(SHAPES) | places | {"a", "photo", "of", "that", "is"})

    def tokenizer(self) -> Any:
        from hooked_vlm.organisms.tokenizer import build_word_tokenizer

        return build_word_tokenizer(self.words(), {"pseudo_token": PSEUDO_TOKEN}, add_bos=True, add_eos=True)

    def generate(self, n: int, seed: int) -> list[Example]:
        """``n`` captioned images; combinations drawn without repeats inside each block of 100 (no false negatives
        inside a batch of <= 100)."""
        rng = np.random.default_rng([seed, 4242])
        all_c = combos()
        out: list[Example] = []
        while len(out) < n:
            for i in rng.permutation(len(all_c))[: n - len(out)]:
                color, shape, place = all_c[int(i)]
                style = int(rng.integers(3))
                decoy = [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))]
                text = caption(color, shape, place, style, decoy)
                out.append(Example("caption", text, text, image=render(color, shape, place, rng),
                                   truth={"color": color, "shape": shape, "place": place, "style": style}))
        return out

    def database(self, seed: int = EVAL_SEED) -> tuple[list[Combo], np.ndarray]:
        """The held-out database: one fresh image per combination, in :func:`combos` order."""
        rng = np.random.default_rng([seed, 1])
        all_c = combos()
        return all_c, np.stack([render(*c, rng) for c in all_c])

    # ----- model ------------------------------------------------------------------------------------------
    def make_config(self) -> Any:
        from transformers import CLIPConfig

        vocab = len(self.tokenizer())
        text = dict(vocab_size=-(-vocab // 16) * 16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
                      patch_size=16, hidden_act="quick_gelu")
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)

    def pixel_values(self, images: list[np.ndarray] | np.ndarray) -> Float[Tensor, "n 3 h w"]:
        """``(x / 255 - mean) / std`` with CLIP's statistics, what ``CLIPImageProcessorPil`` gives at ``SIZE`` px."""
        from hooked_vlm.organisms.rad_llava import CLIP_MEAN, CLIP_STD

        x = torch.from_numpy(np.stack(list(images))).permute(0, 3, 1, 2).to(torch.float64) * (1 / 255)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(CLIP_STD, dtype=torch.float32)[None, :, None, None]
        return (x.to(torch.float32) - mean) / std

    def text_inputs(self, texts: list[str], tokenizer: Any) -> dict[str, Tensor]:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def load(self, model_dir: str | Path) -> tuple[nn.Module, Any, Phi]:
        """The trained ``CLIPModel`` (eval, fp32), its tokenizer and its phi."""
        from transformers import AutoTokenizer, CLIPModel

        model_dir = _checked_dir(model_dir)
        model = CLIPModel.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(model_dir), load_phi(model_dir)

    # ----- training ---------------------------------------------------------------------------------------
    def train(self, out_dir: str | Path, seed: int = 0, steps: int | None = None, eval_n: int = 200, log_every: int = 50,
              phi_steps: int | None = None) -> TrainResult:
        """Train CLIP (``steps``), then phi with CLIP frozen (``phi_steps``), evaluate, save both."""
        from transformers import CLIPModel

        from hooked_vlm.organisms.saving import save_checkpoint
        from hooked_vlm.organisms.training import train_loop

        steps = self.default_steps if steps is None else steps
        phi_steps = (self.phi_steps if steps >= self.default_steps else max(1, steps // 2)) if phi_steps is None else phi_steps
        tokenizer = self.tokenizer()
        config = self.make_config()
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = CLIPModel(config).float()
        start = time.perf_counter()

        def clip_batch(step: int) -> ClipBatch:
            ex = self.generate(self.batch_size, training_stream(seed, step))
            t = self.text_inputs([e.prompt for e in ex], tokenizer)
            return ClipBatch(self.pixel_values([e.image for e in ex]), t["input_ids"], t["attention_mask"])

        def clip_loss(m: nn.Module, b: ClipBatch) -> Tensor:
            return m(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values, return_loss=True).loss

        losses = train_loop(model, clip_batch, clip_loss, steps, lr=self.lr, warmup_steps=min(100, max(1, steps // 10)),
                            seed=seed, log_every=log_every)
        phi, phi_losses = self.train_phi(model, tokenizer, phi_steps, seed, log_every)
        seconds = time.perf_counter() - start
        accuracy = self.measure(model, tokenizer, phi) if eval_n else {}
        result = TrainResult(str(out_dir), steps, seconds, losses, accuracy)
        save_checkpoint(self, model, tokenizer, out_dir, result, seed, extra_files={"preprocessor_config.json": self.preprocessor_json()})
        save_phi(phi, Path(out_dir))
        meta_file = Path(out_dir) / "organism.json"
        meta = json.loads(meta_file.read_text())
        meta.update(phi_steps=phi_steps, phi_loss_first_50=float(np.mean(phi_losses[:50])), phi_loss_last_50=float(np.mean(phi_losses[-50:])))
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        return result

    def train_phi(self, model: nn.Module, tokenizer: Any, steps: int, seed: int, log_every: int = 50) -> tuple[Phi, list[float]]:
        """SEARLE's textual inversion with CLIP frozen: InfoNCE between "a photo of $" (``$ = phi(image)``) and the image."""
        from hooked_vlm.organisms.training import train_loop

        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        cfg = model.config
        phi = Phi(cfg.projection_dim, 4 * cfg.text_config.hidden_size, cfg.text_config.hidden_size)
        pseudo_id = tokenizer.convert_tokens_to_ids(PSEUDO_TOKEN)
        prompt = self.text_inputs([f"a photo of {PSEUDO_TOKEN}"] * self.batch_size, tokenizer)

        def batch(step: int) -> Tensor:
            ex = self.generate(self.batch_size, 7_000_000 + training_stream(seed, step))
            with torch.no_grad():
                return model.get_image_features(pixel_values=self.pixel_values([e.image for e in ex])).pooler_output

        def loss_fn(p: nn.Module, image_embeds: Tensor) -> Tensor:
            text = compose_text_embeds(model, prompt["input_ids"], prompt["attention_mask"], pseudo_id, p(image_embeds))
            logits = nn.functional.normalize(text, dim=-1) @ nn.functional.normalize(image_embeds, dim=-1).T * model.logit_scale.exp()
            target = torch.arange(len(logits))
            return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2

        losses = train_loop(phi, batch, loss_fn, steps, lr=1e-3, warmup_steps=min(50, max(1, steps // 10)), seed=seed, log_every=log_every)
        for p in model.parameters():
            p.requires_grad_(True)
        return phi.eval(), losses

    def preprocessor_json(self) -> str:
        from transformers import CLIPImageProcessorPil

        proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
        return json.dumps(proc.to_dict(), indent=2, default=str) + "\n"

    # ----- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, model: nn.Module, tokenizer: Any, phi: Phi, seed: int = EVAL_SEED) -> dict[str, TaskAccuracy]:
        """Recall@1/5 of caption -> image and of composed retrieval on the held-out database (one image per combination)."""
        all_c, images = self.database(seed)
        db = nn.functional.normalize(model.get_image_features(pixel_values=self.pixel_values(images)).pooler_output, dim=-1)
        index = {c: i for i, c in enumerate(all_c)}
        # caption -> image: one query per combination, plain style-1 caption
        t = self.text_inputs([caption(*c, style=1) for c in all_c], tokenizer)
        text = nn.functional.normalize(model.get_text_features(**t).pooler_output, dim=-1)
        targets = torch.arange(len(all_c))
        r1, r5 = recall_at(text @ db.T, targets, 1), recall_at(text @ db.T, targets, 5)
        # composed: a fresh reference of each combination, every other colour as the modification
        queries = self.composed_queries(seed)
        refs = np.stack([q[0] for q in queries])
        ref_emb = model.get_image_features(pixel_values=self.pixel_values(refs)).pooler_output
        words = phi(ref_emb)
        t = self.text_inputs([composed_query(q[2]) for q in queries], tokenizer)
        comp = compose_text_embeds(model, t["input_ids"], t["attention_mask"], tokenizer.convert_tokens_to_ids(PSEUDO_TOKEN), words)
        comp = nn.functional.normalize(comp, dim=-1)
        ctargets = torch.tensor([index[(q[2], q[1][1], q[1][2])] for q in queries])
        c1, c5 = recall_at(comp @ db.T, ctargets, 1), recall_at(comp @ db.T, ctargets, 5)
        return {name: TaskAccuracy(name, int(hits.sum()), len(hits))
                for name, hits in zip(self.tasks, (r1, r5, c1, c5))}

    def composed_queries(self, seed: int = EVAL_SEED) -> list[tuple[np.ndarray, Combo, str]]:
        """(reference image, its combination, the new colour): every combination x every other colour (400)."""
        rng = np.random.default_rng([seed, 2])
        out = []
        for c in combos():
            image = render(*c, rng)
            out.extend((image, c, new) for new in COLORS if new != c[0])
        return out

    def evaluate(self, model_dir: str | Path, n: int = 200, seed: int = EVAL_SEED) -> dict[str, TaskAccuracy]:
        """Recall@1/5 of retrieval and composed retrieval on a fresh database (``n`` is fixed by the design: 100
        database images, 100 caption queries, 400 composed queries)."""
        model, tokenizer, phi = self.load(model_dir)
        return self.measure(model, tokenizer, phi, seed)


def save_phi(phi: Phi, out_dir: Path) -> None:
    """Write ``phi/model.safetensors`` + ``phi/config.json`` into a checkpoint folder (each file atomically)."""
    from safetensors.torch import save_file

    folder = out_dir / PHI_DIR
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{PHI_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in phi.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / PHI_FILE)
    tmp = folder / f".{PHI_CONFIG}.tmp"
    tmp.write_text(json.dumps(phi.config) + "\n")
    os.replace(tmp, folder / PHI_CONFIG)


def organism(name: str = "shapes-clip") -> ShapesClip:
    if name != ShapesClip.name:
        raise ValueError(f"this module builds shapes-clip, not {name!r}")
    return ShapesClip()
