"""The transformers-free CLIP tokenizer gives transformers' CLIPTokenizer's ids and masks."""

from __future__ import annotations

import shutil

import pytest
import torch

PROMPTS = [
    "a red circle on a blue background",
    "A RED Circle!!",  # upper case, punctuation run
    "   a   red\tcircle \n on    blue  ",  # runs of spaces, tabs, newlines, leading/trailing space
    "it's the cat's hat, isn't it? we'll see; you're right.",  # contractions
    "naïve café: 123 4.5 x2",  # accents, digits one by one
    "Hello,World...again--done",
    "emoji 🎨 and ümlaut",  # bytes outside the vocabulary's words
    "<|endoftext|> special token in text",
    " ".join(["red"] * 100),  # over-long: truncated to 77 with the end token kept
    "x" * 300,
    "",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_folder, tmp_path_factory):
    """Ours reads vocab.json + merges.txt only (tokenizer.json removed, as in Karlo's folder)."""
    from transformers import CLIPTokenizer

    from unclip.engine.tokenizer import ClipTokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    shutil.copytree(tiny_folder / "tokenizer", folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return ClipTokenizer(folder), CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")


def test_single_prompts_match(tokenizers):
    ours, theirs = tokenizers
    for prompt in PROMPTS:
        assert ours(prompt).input_ids == theirs(prompt, verbose=False).input_ids, prompt


def test_padded_batch_matches(tokenizers):
    ours, theirs = tokenizers
    kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a, b = ours(PROMPTS, **kwargs), theirs(PROMPTS, **kwargs)
    assert a.input_ids.shape == (len(PROMPTS), 77)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert ours.model_max_length == theirs.model_max_length == 77
    assert int(a.attention_mask[PROMPTS.index(" ".join(["red"] * 100))].sum()) == 77


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    from unclip.engine.tokenizer import ClipTokenizer
    from unclip.errors import UnclipError

    with pytest.raises(UnclipError, match="vocab.json and merges.txt"):
        ClipTokenizer(tmp_path)
