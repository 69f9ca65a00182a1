"""A 128-token word-level tokenizer for the built-in tiny random-weight models.

Real checkpoints ship their own tokenizers; the tiny models used in tests and in
``hooked-vlm inspect --model tiny-...`` need one that works offline and shares their vocabulary
layout (``/work/shared/notes/hf-reference-models.md`` §2, §7):

====  ========================================================
id    token
====  ========================================================
0     ``<bos>``
1     ``<eos>``
2     ``<pad>``
3-95  93 lower-case English words and punctuation (``WORDS``)
96    ``<unk>``
97    ``<sep>``
98    ``<start_of_image>``   (Gemma3 begin-of-image)
99    ``<end_of_image>``     (Gemma3 end-of-image)
100   ``<|image_pad|>``      (image placeholder, every family)
101   ``<|video_pad|>``      (video placeholder)
102   ``<|vision_start|>``   (Qwen)
103   ``<|vision_end|>``     (Qwen)
104+  ``<unused_0>`` ... ``<unused_23>`` so that every id decodes
====  ========================================================

The text is lower-cased and split on whitespace and punctuation; special tokens are matched
before that, so ``"<|image_pad|>"`` in a prompt is always one id. ``extra_special_tokens`` gives
the tokenizer the attributes HF processors read (``tok.image_token``, ``tok.image_token_id``,
``tok.boi_token`` ...).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["VOCAB_SIZE", "WORDS", "SPECIAL_IDS", "tiny_vocab", "build_tiny_tokenizer"]

VOCAB_SIZE = 128

# ids 3..95, in this order.
WORDS: tuple[str, ...] = (
    # question and function words
    "what", "which", "where", "how", "many", "is", "are", "there", "the", "a", "an", "of", "in", "on", "at",
    "to", "and", "or", "this", "that", "it", "do", "you", "see", "describe", "answer", "question", "yes", "no",
    # the synthetic samples' vocabulary
    "color", "shape", "cell", "row", "column", "grid", "image", "picture", "video", "frame", "object", "moving",
    "moves", "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "gray", "circle", "square",
    "triangle", "shapes", "same", "left", "right", "top", "bottom", "center", "up", "down", "first", "last", "next", "big", "small",
    # numbers
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "zero", "one", "two", "three", "four", "five",
    # chat roles and punctuation
    "user", "assistant", "?", ".", ",", ":", "'", "!", "-",
)

SPECIAL_IDS: dict[str, int] = {
    "<bos>": 0,
    "<eos>": 1,
    "<pad>": 2,
    "<unk>": 96,
    "<sep>": 97,
    "<start_of_image>": 98,
    "<end_of_image>": 99,
    "<|image_pad|>": 100,
    "<|video_pad|>": 101,
    "<|vision_start|>": 102,
    "<|vision_end|>": 103,
}

_FIRST_WORD_ID = 3
_FIRST_UNUSED_ID = 104


def tiny_vocab() -> dict[str, int]:
    """The full token -> id map (128 entries, ids 0..127 each used once)."""
    if len(WORDS) != 93 or len(set(WORDS)) != 93:
        raise AssertionError(f"WORDS must hold 93 distinct words for ids 3..95, has {len(set(WORDS))}")
    vocab = dict(SPECIAL_IDS)
    vocab.update({word: _FIRST_WORD_ID + i for i, word in enumerate(WORDS)})
    vocab.update({f"<unused_{i}>": _FIRST_UNUSED_ID + i for i in range(VOCAB_SIZE - _FIRST_UNUSED_ID)})
    return vocab


def build_tiny_tokenizer(add_bos: bool = True, add_eos: bool = False) -> PreTrainedTokenizerFast:
    """A fresh offline tokenizer for the tiny models.

    ``add_bos`` prepends ``<bos>`` (what the decoder-only tiny VLMs expect); ``add_eos`` appends
    ``<eos>`` (CLIP-style text towers pool the EOS position). Padding defaults to the right, as
    HF tokenizers do; pass ``padding_side="left"`` to the call for last-token batching.
    """
    vocab = tiny_vocab()
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens(list(SPECIAL_IDS))
    single = " ".join(["<bos>"] * add_bos + ["$A"] + ["<eos>"] * add_eos)
    pair = " ".join(["<bos>"] * add_bos + ["$A", "$B"] + ["<eos>"] * add_eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<bos>", 0), ("<eos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        sep_token="<sep>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        model_max_length=1 << 20,
    )
