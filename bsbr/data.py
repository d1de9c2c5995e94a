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

from bsbr._checks import check_positive_int

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


def source_windows(tokenizer, documents: Iterable[Mapping], seq_len: int, windows_per_source: int,
                   sources: Iterable[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """:func:`token_windows` cut from each source's documents separately, so every source is represented.

    Args:
        tokenizer: as :func:`token_windows`.
        documents: dicts with ``"text"`` and ``"source"`` keys (as from :func:`load_split`).
        seq_len: tokens per window, >= 1; windows_per_source: windows from each source, >= 1.
        sources: the sources to draw from, in this order; None = every source in ``documents``, sorted by name.
    Returns:
        ``(ids, names)``: LongTensor ``[len(sources) · windows_per_source, seq_len]`` (the windows of the first source,
        then the next one's, ...) and the source of each row.
    Raises:
        ValueError: ``seq_len``/``windows_per_source`` not an int >= 1; a source with no document or too few tokens
            (naming it).
    """
    check_positive_int(seq_len=seq_len, windows_per_source=windows_per_source)
    documents = list(documents)
    names = sorted({doc["source"] for doc in documents}) if sources is None else list(sources)
    if not names:
        raise ValueError("documents: no document given")
    parts = []
    for name in names:
        chosen = [doc for doc in documents if doc["source"] == name]
        if not chosen:
            raise ValueError(f"sources: no document has source {name!r}")
        try:
            parts.append(token_windows(tokenizer, chosen, seq_len, windows_per_source))
        except ValueError as error:
            raise ValueError(f"source {name!r}: {error}") from None
    return torch.cat(parts), [name for name in names for _ in range(windows_per_source)]
