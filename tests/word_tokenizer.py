"""A BERT WordPiece tokenizer over a given word list, written to a test's tmp_path: the prompt
method tests' tokenizers (nothing downloads)."""

from __future__ import annotations

import transformers


def word_tokenizer(directory, words: list[str]) -> transformers.BertTokenizerFast:
    """``BertTokenizerFast`` whose vocabulary is ``words`` in order (id i = ``words[i]``)."""
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab))
