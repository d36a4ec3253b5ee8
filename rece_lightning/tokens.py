"""Token policy: how long a prompt is, which of its words a tokenizer cannot read, and which positions of two
encoded prompts an erase pair aligns (the reference code's two modes)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from rece_lightning.validation import check_choice

TokenMode = Literal["last_word_onward", "all"]
TOKEN_MODES: tuple[str, ...] = ("last_word_onward", "all")


def token_count(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` with the tokenizer's special tokens (CLIP: BOS and EOS; T5: EOS), untruncated."""
    return len(tokenizer(text, truncation=False).input_ids)


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that ``tokenizer`` reads as its unknown token (a word-level tokenizer's words outside
    its vocabulary, such as the toy model's); always empty for CLIP's byte-level BPE, which has no unknown token
    apart from EOS."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}:
        return []
    return [word for word in text.split() if unk in tokenizer(word, add_special_tokens=False).input_ids]


def select_tokens(
    source: Tensor, source_length: int, target: Tensor, target_length: int, mode: TokenMode
) -> tuple[Tensor, Tensor]:
    """Row-aligned (source, destination) embedding rows for one erase pair.

    ``"all"``: every position of both (RECE's epochs in the reference code). ``"last_word_onward"``: UCE's initial
    edit, from each prompt's last word token to the end, the longer prompt's tail cut so both slices have the same
    length ("nudity" is ``nu`` + ``dity``, so its slice starts at ``dity``; " " starts at BOS, or at EOS for a
    tokenizer without BOS such as T5's).
    """
    check_choice("token mode", mode, TOKEN_MODES)
    if mode == "all":
        return source, target
    total = source.shape[0]
    source_start = max(source_length - 2, 0)
    target_start = max(target_length - 2, 0)
    farthest = max(source_start, target_start)
    return (
        source[source_start : total - (farthest - source_start)],
        target[target_start : total - (farthest - target_start)],
    )
