"""Word-level tokenizers for the organisms: a ``tokenizers`` WordLevel model saved as a real tokenizer.json.

Layout: ``<bos>`` 0, ``<eos>`` 1, ``<pad>`` 2, ``<unk>`` 3, then the organism's special tokens in the order
given (e.g. ``<|vision_start|>``), then its words. Text is lower-cased and split on whitespace and
punctuation; special tokens are matched first, so ``<|image_pad|>`` is always one id. The result is a
``PreTrainedTokenizerFast`` that ``save_pretrained`` writes as ``tokenizer.json`` + ``tokenizer_config.json``
and ``AutoTokenizer.from_pretrained`` loads back, with the attributes HF processors and
``hooked_vlm.inputs`` read (``tok.image_token``, ``tok.vision_start_token``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["BASE_SPECIALS", "build_word_tokenizer"]

BASE_SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")


def build_word_tokenizer(
    words: Sequence[str], special_tokens: Mapping[str, str] | Sequence[str] = (), add_bos: bool = True, add_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``words``.

    ``special_tokens``: extra special tokens; a mapping ``{role: token}`` also sets them as
    ``extra_special_tokens`` (``{"image_token": "<|image_pad|>"}`` gives ``tok.image_token``).
    ``add_bos`` / ``add_eos`` wrap every encoded text (CLIP-style text towers want ``add_eos``).
    """
    roles = dict(special_tokens) if isinstance(special_tokens, Mapping) else {}
    specials = list(BASE_SPECIALS) + list(roles.values() if roles else special_tokens)
    clean = [w.lower() for w in words]
    dupes = sorted({w for w in clean if clean.count(w) > 1} | (set(clean) & set(specials)))
    if dupes:
        raise ValueError(f"vocabulary words must be distinct and not special tokens; repeated: {dupes}")
    split = [w for w in clean if len(pre_tokenizers.Whitespace().pre_tokenize_str(w)) != 1]
    if split:
        raise ValueError(f"each vocabulary entry must be one whitespace/punctuation token; these split: {split}")
    vocab = {tok: i for i, tok in enumerate(specials + clean)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens(specials)
    template = ["<bos>"] * add_bos + ["$A"] + ["<eos>"] * add_eos
    pair = ["<bos>"] * add_bos + ["$A", "$B"] + ["<eos>"] * add_eos
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(template), pair=" ".join(pair), special_tokens=[("<bos>", 0), ("<eos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=roles, model_max_length=1 << 16,
    )
