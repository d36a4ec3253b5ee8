"""Token policy: how long a prompt is, which of its words a tokenizer cannot read, and which positions of two
encoded prompts an erase pair aligns (the reference code's two modes)."""

from __future__ import annotations

from typing import Literal

import torch
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


def whole_words(tokenizer) -> dict[str, int]:
    """Vocabulary entries that are a whole word of letters (CLIP's ``word</w>``, SentencePiece's ``▁word``, a
    word-level vocabulary's entries), lower-cased, with their token id, in token-id order.

    Where several entries spell the same word (CLIP's ``nu</w>`` and the word piece ``nu``, ``Rose</w>`` and
    ``rose</w>``), the marked whole word wins over an unmarked piece, then the lower id: never the order
    ``get_vocab()`` happens to return (a Rust-backed tokenizer's differs from process to process, and with it the
    nearest words of every search)."""
    chosen: dict[str, tuple[bool, int]] = {}  # word -> (unmarked, id): the smallest wins
    for token, index in tokenizer.get_vocab().items():
        word = token.removesuffix("</w>").removeprefix("▁").removeprefix("Ġ")
        if word.isalpha() and word.isascii() and (token != word or len(token) > 1):
            candidate = (token == word, index)
            key = word.lower()
            if key not in chosen or candidate < chosen[key]:
                chosen[key] = candidate
    return {word: index for word, (_, index) in sorted(chosen.items(), key=lambda item: item[1][1])}


def nearest_words(
    tokenizer, table: Tensor, prompts: list[str], count: int, exclude: set[str] | None = None
) -> list[str]:
    """The ``count`` whole words (:func:`whole_words`) whose input token embedding (rows of ``table``) is nearest, by
    cosine, to any token of ``prompts``; the prompts' own words and ``exclude`` left out."""
    own = {w.lower() for p in prompts for w in p.split()} | {w.lower() for w in exclude or ()}
    words = {word: index for word, index in whole_words(tokenizer).items() if word not in own}
    if not words or count < 1:
        return []
    ids = [i for p in prompts for i in tokenizer(p, add_special_tokens=False).input_ids]
    unit = torch.nn.functional.normalize(table.float(), dim=1)  # a ranking: float32 is plenty
    similarity = (unit[torch.tensor(list(words.values()))] @ unit[ids].T).amax(dim=1)
    names = list(words)
    # stable: equally near words keep token-id order
    return [names[i] for i in similarity.argsort(descending=True, stable=True)[:count].tolist()]
