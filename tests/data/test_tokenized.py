"""Tokenising once per unique text gives exactly what the tokenizer gives for the whole pair."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from speclora.data.tokenized import tokenize_examples
from speclora.tasks import Example


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    return AutoTokenizer.from_pretrained(tiny_backbone)


def _seq(split, s):
    a, b = int(split.seq_offsets[s]), int(split.seq_offsets[s + 1])
    return split.ids[a:b].tolist(), split.type_ids[a:b].tolist()


@pytest.mark.parametrize("max_length", [12, 16, 64])
def test_pairs_match_the_tokenizer_including_truncation(tokenizer, max_length):
    texts = [
        ("A man is playing a guitar on the stage tonight.", "Someone plays music."),
        ("Short.", "A much longer second segment that will need trimming for sure, yes."),
        ("Equal length here ok", "Equal length there ok"),
    ]
    examples = [Example(i, i, ((a, b),), 0.0, i, i + 1) for i, (a, b) in enumerate(texts)]
    split = tokenize_examples(examples, tokenizer, max_length)
    for i, (a, b) in enumerate(texts):
        ref = tokenizer(a, b, truncation="longest_first", max_length=max_length, return_token_type_ids=True)
        ids, types = _seq(split, i)
        assert ids == ref["input_ids"]
        assert types == ref["token_type_ids"]


def test_single_sentences_and_shared_texts(tokenizer):
    examples = [
        Example(0, 0, (("the same premise", "choice one"), ("the same premise", "choice two")), 1.0, 0, 1),
        Example(1, 1, (("the same premise", "another"),), 0.0, 1, 2),
    ]
    split = tokenize_examples(examples, tokenizer, 32)
    assert split.ex_seq_count.tolist() == [2, 1]
    assert _seq(split, 1)[0] == tokenizer("the same premise", "choice two")["input_ids"]
    single = tokenize_examples([Example(0, 0, (("just one sentence",  None),), 1.0, 0, 1)], tokenizer, 4)
    assert _seq(single, 0)[0] == tokenizer("just one sentence", truncation=True, max_length=4)["input_ids"]


def test_mixed_single_and_pair_is_refused(tokenizer):
    examples = [Example(0, 0, (("a", None),), 0.0, 0, 1), Example(1, 1, (("a", "b"),), 0.0, 1, 2)]
    with pytest.raises(ValueError, match="mixes single sentences and pairs"):
        tokenize_examples(examples, tokenizer, 16)
