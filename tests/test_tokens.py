"""Which vocabulary words the searches see (neighbour preservation, the in-loop attacks) must not depend on the order
a tokenizer happens to list its vocabulary in: a Rust-backed tokenizer's ``get_vocab()`` order differs per process."""

from __future__ import annotations

import random

import pytest

from rece_lightning import diffusion
from rece_lightning.tokens import nearest_words, whole_words


class ListedInOrder:
    """A tokenizer whose ``get_vocab()`` lists the same entries in the order ``seed`` shuffles them into."""

    def __init__(self, tokenizer, seed: int) -> None:
        self._tokenizer, self._seed = tokenizer, seed

    def get_vocab(self) -> dict[str, int]:
        items = list(self._tokenizer.get_vocab().items())
        random.Random(self._seed).shuffle(items)
        return dict(items)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


class Vocabulary:
    def __init__(self, entries: dict[str, int]) -> None:
        self.entries = entries

    def get_vocab(self) -> dict[str, int]:
        return dict(self.entries)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_a_marked_whole_word_beats_a_piece_of_the_same_letters_then_the_lower_id(order):
    entries = [("nu", 5), ("nu</w>", 9), ("Rose</w>", 3), ("rose</w>", 7), ("x", 1), ("ab", 2), ("▁sky", 4)]
    random.Random(order).shuffle(entries)
    assert list(whole_words(Vocabulary(dict(entries))).items()) == [("ab", 2), ("rose", 3), ("sky", 4), ("nu", 9)]


def test_the_nearest_words_are_the_same_whatever_order_the_vocabulary_is_listed_in(tiny_pipeline_dir):
    pipeline = diffusion.load_pipeline(str(tiny_pipeline_dir))
    table = pipeline.text_encoder.get_input_embeddings().weight.detach()
    found = [
        nearest_words(ListedInOrder(pipeline.tokenizer, seed), table, ["nudity"], 40, exclude={"the"})
        for seed in range(3)
    ]
    assert len(found[0]) == 40 and "nudity" not in found[0] and "the" not in found[0]
    assert found[0] == found[1] == found[2]
    words = whole_words(pipeline.tokenizer)
    assert all(w.isalpha() for w in words) and list(words.values()) == sorted(words.values())
