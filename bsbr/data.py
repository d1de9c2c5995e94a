"""Corpus access for experiments: the splits written by `pipelines/prepare_corpus.py` and fixed-length
token windows cut from them.

    docs = load_split("data/corpus", "validation")                     # list of dicts
    ids = token_windows(tokenizer, docs, seq_len=1024, num_windows=8)  # LongTensor [8, 1024]
    ids, sources = source_windows(tokenizer, docs, seq_len=4096, windows_per_source=2)  # [4, 4096], 4 names
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from bsbr._checks import check_int_at_least, check_positive_int

SPLITS = ("train", "validation", "test")


def load_split(corpus_dir: str | os.PathLike, split: str) -> list[dict]:
    """Documents of one split, in file order (sorted by doc_id).

    Args:
        corpus_dir: the `prepare_corpus` output folder, e.g. "data/corpus".
        split: "train", "validation" or "test".

    Returns:
        list of {"doc_id": str, "source": "pydoc" | "shakespeare", "title": str, "text": str}.

    Raises:
        ValueError: `split` is not one of the three names.
        FileNotFoundError: `<corpus_dir>/<split>.jsonl` does not exist (run the prepare_corpus stage).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python pipelines/prepare_corpus.py` (dvc stage prepare_corpus)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def token_windows(
    tokenizer,
    documents: Iterable[Mapping | str],
    seq_len: int,
    num_windows: int,
    *,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of token ids from documents joined by EOS, in order, no padding.

    The documents are tokenized one by one (`tokenizer.encode(text, add_special_tokens=False)`)
    and concatenated as doc_0 EOS doc_1 EOS doc_2 ...; window i is tokens [i*seq_len, (i+1)*seq_len).
    Tokenization stops as soon as num_windows * seq_len tokens are available; the remainder is dropped.
    Deterministic: the same documents and tokenizer give the same tensor.

    Args:
        tokenizer: anything with `encode(text, add_special_tokens=False) -> list[int]` and
            `eos_token_id` (a transformers tokenizer).
        documents: dicts with a "text" key (as from `load_split`) or plain strings.
        seq_len: tokens per window, >= 1.
        num_windows: number of windows, >= 1.
        eos_token_id: separator id; default `tokenizer.eos_token_id` (for the SmolLM2-Instruct GGUF
            that is 2, "<|im_end|>").

    Returns:
        LongTensor [num_windows, seq_len] of token ids.

    Raises:
        ValueError: seq_len or num_windows not an int >= 1; no EOS id; the documents hold fewer than
            num_windows * seq_len tokens (the message gives both counts).
    """
    check_positive_int(seq_len=seq_len, num_windows=num_windows)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("eos_token_id: the tokenizer has no eos_token_id; pass eos_token_id=")
    needed = num_windows * seq_len
    ids: list[int] = []
    for doc in documents:
        if len(ids) >= needed:
            break
        if ids:
            ids.append(eos)
        text = doc if isinstance(doc, str) else doc["text"]
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) < needed:
        raise ValueError(
            f"num_windows: {num_windows} windows of seq_len {seq_len} need {needed} tokens, "
            f"the documents give only {len(ids)} (EOS separators included)"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(num_windows, seq_len)  # [num_windows, seq_len]


def source_windows(
    tokenizer,
    documents: Iterable[Mapping],
    seq_len: int,
    num_windows: int,
    *,
    skip: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`token_windows` of each source separately: the documents of one ``"source"`` (e.g. ``"pydoc"``,
    ``"shakespeare"``) joined by EOS, windows ``skip … skip + num_windows − 1`` of them (``skip`` leaves the first
    windows to another use, e.g. evaluation windows and a disjoint curve window from one split).

    Returns:
        ``{source: LongTensor [num_windows, seq_len]}`` in the order the sources first appear in ``documents``.
    Raises:
        ValueError: a document without ``"source"``; ``skip`` negative; a source too short (the message names it
            and gives the counts); or as :func:`token_windows`.
    """
    check_int_at_least(0, skip=skip)
    by_source: dict[str, list] = {}
    for index, doc in enumerate(documents):
        if not isinstance(doc, Mapping) or "source" not in doc:
            raise ValueError(f"documents[{index}] has no 'source' key: source_windows needs load_split's dicts")
        by_source.setdefault(doc["source"], []).append(doc)
    windows = {}
    for source, docs in by_source.items():
        try:
            windows[source] = token_windows(tokenizer, docs, seq_len, skip + num_windows)[skip:]
        except ValueError as error:
            raise ValueError(f"source {source!r}: {error}") from None
    return windows
