"""bsbr.data: load_split and token_windows on a tiny fake tokenizer (no downloads)."""

import json

import pytest
import torch

from bsbr.data import load_split, source_windows, token_windows


class CharTokenizer:
    """One token per character: id = ord(c); EOS = 0."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def _ids(text):
    return [ord(c) for c in text]


def test_token_windows_exact_contents():
    docs = [{"text": "abc"}, {"text": "de"}, {"text": "fghij"}]
    out = token_windows(CharTokenizer(), docs, seq_len=4, num_windows=2)
    # stream: a b c EOS d e EOS f g h i j -> [a b c EOS] [d e EOS f], remainder dropped
    expected = torch.tensor([_ids("abc") + [0], _ids("de") + [0] + _ids("f")])
    assert out.dtype == torch.long
    assert out.shape == (2, 4)
    assert torch.equal(out, expected)


def test_token_windows_strings_custom_eos_and_exact_fit():
    out = token_windows(CharTokenizer(), ["ab", "cd"], seq_len=5, num_windows=1, eos_token_id=7)
    assert out.tolist() == [_ids("ab") + [7] + _ids("cd")]


def test_token_windows_stops_tokenizing_when_enough():
    class Counting(CharTokenizer):
        calls = 0

        def encode(self, text, add_special_tokens=False):
            Counting.calls += 1
            return super().encode(text, add_special_tokens)

    out = token_windows(Counting(), ["abcdef", "never", "read"], seq_len=3, num_windows=2)
    assert out.tolist() == [_ids("abc"), _ids("def")]
    assert Counting.calls == 1


def test_token_windows_deterministic():
    docs = ["the quick brown fox", "jumps over", "the lazy dog"]
    a = token_windows(CharTokenizer(), docs, seq_len=8, num_windows=4)
    b = token_windows(CharTokenizer(), list(docs), seq_len=8, num_windows=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, name", [
    ({"seq_len": 0, "num_windows": 1}, "seq_len"),
    ({"seq_len": 2.0, "num_windows": 1}, "seq_len"),
    ({"seq_len": 2, "num_windows": 0}, "num_windows"),
    ({"seq_len": True, "num_windows": 1}, "seq_len"),
])
def test_token_windows_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        token_windows(CharTokenizer(), ["abcdef"], **kwargs)


def test_token_windows_not_enough_tokens():
    # "abc" EOS "de" = 6 tokens < 2 * 4
    with pytest.raises(ValueError, match=r"num_windows: 2 windows of seq_len 4 need 8 tokens, the documents give only 6"):
        token_windows(CharTokenizer(), ["abc", "de"], seq_len=4, num_windows=2)
    with pytest.raises(ValueError, match="num_windows"):
        token_windows(CharTokenizer(), [], seq_len=1, num_windows=1)


def test_token_windows_needs_eos():
    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        token_windows(NoEos(), ["abc"], seq_len=1, num_windows=1)
    assert token_windows(NoEos(), ["abc", "d"], seq_len=5, num_windows=1, eos_token_id=9).tolist() == [_ids("abc") + [9] + _ids("d")]


def test_load_split_roundtrip(tmp_path):
    rows = [
        {"doc_id": "pydoc/assert", "source": "pydoc", "title": "The \"assert\" statement", "text": "Assert ...\n"},
        {"doc_id": "shakespeare/hamlet", "source": "shakespeare", "title": "Hamlet", "text": "HAMLET\n\nACT I. — ünïcode"},
    ]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_split(tmp_path, "validation") == rows


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation', 'test'\), got 'valid'"):
        load_split(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="prepare_corpus"):
        load_split(tmp_path, "test")


def test_source_windows_cut_each_source_separately_and_skip():
    from bsbr.data import source_windows

    docs = [{"source": "a", "text": "abc"}, {"source": "b", "text": "xyzw"}, {"source": "a", "text": "de"}]
    tok = CharTokenizer()
    windows = source_windows(tok, docs, 2, 2)
    assert list(windows) == ["a", "b"]  # order of first appearance
    assert windows["a"].tolist() == [_ids("ab"), _ids("c") + [tok.eos_token_id]]  # a's documents only, EOS-joined
    assert windows["b"].tolist() == [_ids("xy"), _ids("zw")]
    skipped = source_windows(tok, docs, 2, 1, skip=1)
    assert skipped["a"].tolist() == windows["a"][1:].tolist() and skipped["b"].tolist() == windows["b"][1:].tolist()
    with pytest.raises(ValueError, match="source 'b'"):
        source_windows(tok, docs, 2, 3)
    with pytest.raises(ValueError, match="skip"):
        source_windows(tok, docs, 2, 1, skip=-1)
    with pytest.raises(ValueError, match=r"documents\[0\] has no 'source'"):
        source_windows(tok, ["plain text"], 2, 1)
