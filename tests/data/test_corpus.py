import json

import numpy as np
import pytest

from pangu_moe.config import DataConfig
from pangu_moe.data import demo_corpus, pipeline, tokenizer
from pangu_moe.data.corpus import DataError, load_corpus, read_folders, read_jsonl, split_domains


def _jsonl(tmp_path, records, raw_tail=b""):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + raw_tail)
    return str(path)


def test_byte_tokenizer_round_trip():
    ids = tokenizer.encode("héllo\n")
    assert ids.tolist() == [104, 195, 169, 108, 108, 111, 10]
    assert tokenizer.decode(ids) == "héllo\n"


def test_jsonl_reader_groups_documents_by_domain(tmp_path):
    path = _jsonl(tmp_path, [{"text": "a1", "domain": "a"}, {"text": "b1", "domain": "b"},
                             {"text": "a2", "domain": "a"}])
    assert read_jsonl(path, ["a", "b"]) == {"a": ["a1", "a2"], "b": ["b1"]}


@pytest.mark.parametrize("records, tail, message", [
    ([{"text": "x", "domain": "zz"}], b"", r"c.jsonl:1: unknown domain 'zz'; data.domains allows a, b"),
    ([{"text": "x", "domain": "a"}], b"{not json\n", r"c.jsonl:2: not valid JSON"),
    ([{"text": "x", "domain": "a"}], b'{"text": "caf\xe9", "domain": "a"}\n', r"c.jsonl:2: not UTF-8 text \(byte 13\)"),
    ([{"text": 5, "domain": "a"}], b"", r"c.jsonl:1: must be an object with string fields"),
])
def test_jsonl_reader_errors_name_file_and_line(tmp_path, records, tail, message):
    with pytest.raises(DataError, match=message):
        read_jsonl(_jsonl(tmp_path, records, tail), ["a", "b"])


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "nope.jsonl"), ["a"])
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "empty.jsonl"), domains=["a"])
    with pytest.raises(DataError, match="domain 'a' has no text"):
        load_corpus(cfg, seq_len=8)


def test_too_little_text_is_an_error(tmp_path):
    cfg = DataConfig(source="jsonl", path=_jsonl(tmp_path, [{"text": "short", "domain": "a"}]), domains=["a"])
    with pytest.raises(DataError, match=r"domain 'a' has \d+ bytes of training text; need at least 65"):
        load_corpus(cfg, seq_len=64)


def test_folder_reader(tmp_path):
    for domain, name, text in [("a", "2.txt", "second"), ("a", "1.txt", "first"), ("b", "x/y.txt", "deep")]:
        path = tmp_path / domain / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "a" / "skip.md").write_text("not a txt")
    assert read_folders(str(tmp_path), ["a", "b"]) == {"a": ["first", "second"], "b": ["deep"]}
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="sub-folder 'c' is an unknown domain"):
        read_folders(str(tmp_path), ["a", "b"])


def test_folder_reader_rejects_non_utf8(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(byte 3\)"):
        read_folders(str(tmp_path), ["a"])


def test_split_is_by_document_and_deterministic():
    docs = {"a": [f"doc{i:02d} " * 10 for i in range(40)]}
    (a,) = split_domains(docs, 0.1, 10**9, 10, "test")
    val_text = tokenizer.decode(a.val)
    assert "doc05" in val_text and "doc15" in val_text and "doc04" not in val_text
    assert len(a.train) + len(a.val) == sum(len(d) for d in docs["a"]) + 2 * (40 - 2)


def test_demo_corpus_is_deterministic_with_two_domains():
    first = demo_corpus.documents(20000)
    again = demo_corpus.documents(20000)
    assert first == again and set(first) == {"prose", "code"}
    assert any("def " in t for t in first["code"]) and sum(len(t) for t in first["prose"]) >= 20000


def test_train_windows_are_a_function_of_seed_and_index():
    domains = split_domains({"a": ["x" * 500], "b": ["y" * 500]}, 0.2, 10**9, 9, "t")
    src = pipeline.TrainWindows(domains, 8, seed=3, start=0, count=100, mixture="uniform")
    shifted = pipeline.TrainWindows(domains, 8, seed=3, start=40, count=60, mixture="uniform")
    for i in (0, 7):
        for u, v in zip(src[40 + i], shifted[i]):
            np.testing.assert_array_equal(u, v)
    inputs, labels, dom = src[5]
    letter = ord("x") if dom[0] == 0 else ord("y")
    assert (inputs == letter).all() and (labels == letter).all() and len(set(dom)) == 1
    assert [src[i][2][0] for i in range(6)] == [0, 1, 0, 1, 0, 1]  # uniform mixture alternates domains
    by_bytes = pipeline.TrainWindows(domains, 8, seed=3, start=0, count=200, mixture="bytes")
    picked = [by_bytes[i][2][0] for i in range(200)]
    assert 60 < sum(picked) < 140 and picked[:6] != [0, 1, 0, 1, 0, 1]
    # by_node, B = 8 over 4 ranks on 2 nodes: rank r holds samples 2r, 2r+1; node 0 = ranks 0-1 -> domain 0.
    by_node = pipeline.TrainWindows(domains, 8, seed=3, start=8, count=16, mixture="by_node", layout=(8, 4, 2))
    assert [by_node[i][2][0] for i in range(16)] == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4


def test_val_windows_are_balanced_and_interleaved():
    # Domain a has 50 validation bytes (6 windows of 8+1), domain b 200 (24 windows): 6 of each are used,
    # spread evenly over b's text.
    domains = split_domains({"a": ["ab" * 50], "b": ["".join(chr(65 + i // 9 % 26) for i in range(400))]},
                            0.5, 10**9, 9, "t")
    inputs, labels, dom = pipeline.val_windows(domains, 8)
    assert inputs.shape == (12, 8) and (labels[:, :-1] == inputs[:, 1:]).all()
    assert dom[:, 0].tolist() == [0, 1] * 6 and (dom == dom[:, :1]).all()
    b_windows = [tokenizer.decode(w) for w in inputs[1::2]]
    assert b_windows[0][0] != b_windows[-1][0]  # first and last windows of b come from different places


def test_unigram_entropy_of_scored_bytes():
    labels = np.array([[97, 98, 99, 99], [99, 99, 97, 98]])  # p = 1/4, 1/4, 1/2 -> 1.5 bits
    assert abs(pipeline.unigram_bpb(labels) - 1.5) < 1e-12


def test_byte_unigram_bpb_counts_the_bytes_of_the_tokens():
    pieces = [b"a", b"b", b"ab", b"aaab"]
    # tokens 2, 3, 0: the text "ab" + "aaab" + "a" = 5 a's and 2 b's
    expected = -(5 / 7 * np.log2(5 / 7) + 2 / 7 * np.log2(2 / 7))
    assert pipeline.byte_unigram_bpb(np.array([[2, 3, 0]]), pieces) == pytest.approx(expected, rel=1e-12)
    labels = np.array([[0, 0, 1, 1]])
    assert pipeline.byte_unigram_bpb(labels, pieces) == pipeline.unigram_bpb(labels) == 1.0  # one byte a token
