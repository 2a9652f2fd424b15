"""prepare-data and the prepared source: tokenizers, MindRecord shards, per-rank streams, resume, bad input."""
import json
import os
import shutil

import numpy as np
import pytest

from pangu_moe import cli, generate
from pangu_moe.data import pipeline, prepared
from pangu_moe.data.corpus import DataError
from pangu_moe.data.prepare import MANIFEST, prepare
from pangu_moe.data.prepared import PreparedCorpus, RankStream, train_batches, val_windows
from pangu_moe.data.tokenizer import BpeTokenizer, ByteTokenizer
from pangu_moe.train.checkpoint import remove
from pangu_moe.train.metrics import read
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

MIXED = ["Grüße aus Zürich — naïve café, señor.", "日本語のテキストと中文文本。", "emoji 🚀🙂👍🏽 and tabs\tend",
         "def f(x):\n    return x * 2  # ascii"]
SEQ = 16


def _corpus(n=60):
    """Documents alternating prose / code, with every script of MIXED."""
    return [{"text": f"{i}: " + MIXED[i % len(MIXED)] * (1 + i % 3), "domain": ("prose", "code")[i % 2]}
            for i in range(n)]


def _jsonl(path, records, extra=b""):
    """A JSONL file of `records`, then the raw bytes `extra`."""
    with open(path, "wb") as fh:
        for r in records:
            fh.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        fh.write(extra)
    return str(path)


BAD_UTF8 = b'{"text": "\xff\xfe bad", "domain": "code"}\n'  # the first bad byte is byte 10 of its line


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    source = _jsonl(root / "c.jsonl", _corpus())
    prepare(source, str(root / "bpe"), ["prose", "code"], SEQ, tokenizer="bpe:300", val_fraction=0.2,
            shard_records=40, log=lambda line: None)
    return root


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_tokenizers_round_trip_mixed_scripts_and_count_their_bytes(tokenizer):
    tok = ByteTokenizer() if tokenizer == "bytes" else BpeTokenizer.train(iter(MIXED * 20), 320)
    for text in MIXED + ["".join(MIXED)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    if tokenizer == "bpe":
        assert tok.vocab_size == 320 and len(tok.encode("".join(MIXED))) < len("".join(MIXED).encode("utf-8"))


def test_text_to_shards_to_windows_to_text(bpe_dir):
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    tok, manifest = corpus.tokenizer, corpus.manifest
    docs = [r["text"] for r in _corpus() if r["domain"] == "code"]
    every = manifest["val_every"]
    train_text = "\n\n".join(d for i, d in enumerate(docs) if i % every != every // 2)
    n = corpus.windows["code", "train"]
    windows = corpus.read("code", "train", 0, n)  # across the 40-window shard files
    assert windows.shape == (n, SEQ + 1) and len(corpus.files["code", "train"]) == -(-n // 40)
    assert (windows[1:, 0] == windows[:-1, -1]).all()  # consecutive windows overlap by one token
    stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    decoded = tok.decode(stream)
    assert train_text.startswith(decoded.rstrip("\ufffd")) and len(decoded) > 0.9 * len(train_text)
    assert manifest["counts"]["code"]["train"]["bytes"] == sum(
        len(d.encode("utf-8")) for i, d in enumerate(docs) if i % every != every // 2)
    np.testing.assert_array_equal(corpus.read("code", "train", 35, 10), windows[35:45])


def test_reads_across_records_and_files_equal_windows_cut_from_the_text(tmp_path, monkeypatch):
    """Bytes, 150 windows a file (records of 64, 64 and 22): any range read equals the windows cut by hand."""
    docs = [r["text"] for r in _corpus(400) if r["domain"] == "prose"]
    source = _jsonl(tmp_path / "c.jsonl", [{"text": d, "domain": "prose"} for d in docs])
    manifest = prepare(source, str(tmp_path / "out"), ["prose"], SEQ, val_fraction=0.1, shard_records=150,
                       log=lambda line: None)
    every = manifest["val_every"]
    stream = "\n\n".join(d for i, d in enumerate(docs) if i % every != every // 2).encode("utf-8")
    expected = np.frombuffer(stream, np.uint8).astype(np.int32)
    corpus = PreparedCorpus(str(tmp_path / "out"))
    n = corpus.windows["prose", "train"]
    assert n == (len(expected) - 1) // SEQ and n > 2 * 150
    assert [s["records"] for s in manifest["shards"] if s["split"] == "train"][:2] == [3, 3]
    for start, count in ((0, 1), (60, 10), (63, 2), (140, 20), (149, 150), (n - 5, 5), (0, n)):
        got = corpus.read("prose", "train", start, count)
        want = np.stack([expected[k * SEQ:k * SEQ + SEQ + 1] for k in range(start, start + count)])
        np.testing.assert_array_equal(got, want)
    for shard in manifest["shards"]:  # 150 windows of 17 int32 (10 KB): MindRecord's defaults made each 48 MB by ls
        assert os.path.getsize(tmp_path / "out" / shard["file"]) < 256 * 1024
    import mindspore.dataset as ds
    opened, real = [], ds.MindDataset
    monkeypatch.setattr(ds, "MindDataset", lambda files, **kw: opened.append([f[-20:] for f in files]) or real(
        files, **kw))
    files = sorted(s["file"][-20:] for s in manifest["shards"] if s["split"] == "train")
    for start, count, want in ((0, 1, files[:1]), (0, 150, files[:1]), (149, 150, files[:2]), (150, 150, files[1:2]),
                               (300, 20, files[2:3]), (n - 5, 5, files[-1:])):
        corpus.read("prose", "train", start, count)
        assert opened.pop() == want, (start, count)  # only the files holding the windows are opened


def test_rank_shares_are_disjoint_and_cover_the_data(bpe_dir, monkeypatch):
    monkeypatch.setattr(prepared, "BLOCK", 8)  # several blocks per share, the last one shorter
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    n = corpus.windows["prose", "train"]
    share = n // 2
    everything = corpus.read("prose", "train", 0, n)

    def multiset(windows):
        return sorted(w.tobytes() for w in windows)

    for rank in range(2):  # rank r reads windows [r * share, (r + 1) * share): disjoint, together all but n mod 2
        stream = RankStream(corpus, 0, rank, 2, seed=3)
        epoch = np.stack([stream.next() for _ in range(share)])
        assert multiset(epoch) == multiset(everything[rank * share:(rank + 1) * share])
        again = np.stack([stream.next() for _ in range(share)])  # the next epoch: the same windows, another order
        assert multiset(again) == multiset(epoch) and not np.array_equal(again, epoch)
        reads = []
        monkeypatch.setattr(corpus, "read", lambda *args: reads.append(args[2]) or PreparedCorpus.read(corpus, *args))
        order = RankStream(corpus, 0, rank, 2, seed=3)
        for _ in range(2 * share):
            order.next()
        blocks = len(reads) // 2  # each block is read once an epoch, at its first window: the blocks' visiting order
        assert blocks > 3 and sorted(reads[:blocks]) == sorted(reads[blocks:]) and reads[:blocks] != reads[blocks:]
        later = RankStream(corpus, 0, rank, 2, seed=3, consumed=share + 13)  # from a position inside epoch 1
        np.testing.assert_array_equal(np.stack([later.next() for _ in range(share - 13)]), again[13:])
    assert share % 8 and share > 3 * 8


@pytest.mark.parametrize("mixture", ["uniform", "bytes", "by_node"])
def test_batches_from_a_position_are_the_tail_of_batches_from_zero(bpe_dir, mixture):
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    whole = list(train_batches(corpus, 4, 11, 0, 9, mixture, world=2, devices_per_node=1))
    tail = list(train_batches(corpus, 4, 11, 5, 9, mixture, world=2, devices_per_node=1))
    assert len(tail) == 4 and all(all(np.array_equal(a, b) for a, b in zip(x, y)) for x, y in zip(whole[5:], tail))
    domains = np.stack([b[2][:, 0] for b in whole])  # (steps, B)
    if mixture == "uniform":
        assert (domains == [0, 1, 0, 1]).all()
    if mixture == "by_node":
        assert (domains == [0, 0, 1, 1]).all()  # 2 nodes of one device: node n holds domain n


@pytest.mark.parametrize("mixture", ["uniform", "by_node"])
def test_a_process_reads_only_its_rows(bpe_dir, mixture, monkeypatch):
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    whole = list(train_batches(corpus, 4, 11, 3, 7, mixture, world=2, devices_per_node=1))
    read = []
    monkeypatch.setattr(RankStream, "__init__", _recording(RankStream.__init__, read))
    mine = list(train_batches(corpus, 4, 11, 3, 7, mixture, world=2, devices_per_node=1, rows=slice(2, 4)))
    assert len(mine) == 4 and all(all(np.array_equal(a[2:], b) for a, b in zip(x, y)) for x, y in zip(whole, mine))
    assert read and {rank for rank, _ in read} == {1}  # rank 1's streams only: rank 0's share is never read


def _recording(init, read):
    def recorded(self, corpus, domain, rank, world, seed, consumed=0):
        read.append((rank, domain))
        init(self, corpus, domain, rank, world, seed, consumed)
    return recorded


def test_in_memory_rows_are_the_global_batches_rows():
    from pangu_moe.data.corpus import load_corpus
    domains = load_corpus(tiny_config().data, 32)
    whole = list(pipeline.train_batches(domains, 32, 4, 5, 2, 5, "by_node", 2, 1))
    mine = list(pipeline.train_batches(domains, 32, 4, 5, 2, 5, "by_node", 2, 1, rows=slice(2, 4)))
    assert len(mine) == 3 and all(all(np.array_equal(a[2:], b) for a, b in zip(x, y)) for x, y in zip(whole, mine))
    assert (mine[0][2][:, 0] == [1, 1]).all()  # by_node: node 1 holds domain 1


def test_in_memory_batches_from_a_position_are_the_tail_of_batches_from_zero():
    from pangu_moe.data.corpus import load_corpus
    domains = load_corpus(tiny_config().data, 32)
    whole = list(pipeline.train_batches(domains, 32, 4, 5, 0, 6, "bytes"))
    tail = list(pipeline.train_batches(domains, 32, 4, 5, 4, 6, "bytes"))
    assert all(all(np.array_equal(a, b) for a, b in zip(x, y)) for x, y in zip(whole[4:], tail))


def test_validation_windows_interleave_the_domains(bpe_dir):
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    inputs, labels, domain_ids = val_windows(corpus, 2)
    assert inputs.shape == (4, SEQ) and (domain_ids[:, 0] == [0, 1, 0, 1]).all()
    np.testing.assert_array_equal(labels[1], corpus.read("code", "val", 0, 1)[0, 1:])


def _refused(tmp_path, records, message, extra=b"", **options):
    source = _jsonl(tmp_path / "bad.jsonl", records, extra)
    out = tmp_path / f"out{len(os.listdir(tmp_path))}"
    with pytest.raises(DataError, match=message) as error:
        prepare(source, str(out), ["prose", "code"], SEQ, log=lambda line: None, **options)
    assert "\n" not in str(error.value)
    assert not os.path.exists(out / MANIFEST)


def test_bad_input_is_refused_in_one_line_and_writes_no_manifest(tmp_path):
    good = _corpus(20)
    _refused(tmp_path, good, r"bad.jsonl:21: not valid JSON", extra=b"{not json\n")
    _refused(tmp_path, good + [{"body": "x", "domain": "code"}], r"bad.jsonl:21: must be an object with string "
                                                                  r"fields \"text\" and \"domain\"")
    _refused(tmp_path, good + [{"text": "x", "domain": "law"}], r"bad.jsonl:21: unknown domain 'law'")
    _refused(tmp_path, good, r"bad.jsonl:21: not UTF-8 text \(byte 10\)", extra=BAD_UTF8)
    _refused(tmp_path, good[:2], r"domain 'prose' gives no val window")
    _refused(tmp_path, good, r"--tokenizer bpe:12: the BPE vocabulary must be an integer above 256",
             tokenizer="bpe:12")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    _refused(tmp_path, good, r"words.json: cannot be used \(not a byte-level BPE without added tokens \(pre-tokenizer "
                             r"Whitespace, decoder None, 0 added tokens\)\)", tokenizer=str(tmp_path / "words.json"))


def test_bad_utf8_is_replaced_and_counted_and_empty_documents_are_counted(tmp_path):
    source = _jsonl(tmp_path / "c.jsonl", _corpus(20) + [{"text": "", "domain": "prose"}], BAD_UTF8)
    with pytest.raises(DataError, match=r"c.jsonl:22: not UTF-8 text \(byte 10\)"):
        prepare(source, str(tmp_path / "strict"), ["prose", "code"], SEQ, log=lambda line: None)
    manifest = prepare(source, str(tmp_path / "out"), ["prose", "code"], SEQ, bad_utf8="replace",
                       tokenizer="bpe:280", val_fraction=0.2, log=lambda line: None)
    assert manifest["skipped"] == {"empty_documents": 1, "replaced_utf8_documents": 1}  # counted once, not per pass
    code = manifest["counts"]["code"]
    assert code["train"]["documents"] + code["val"]["documents"] == 11


def test_a_damaged_or_unfinished_folder_is_refused(bpe_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(bpe_dir / "bpe", damaged)
    shard = next(f for f in sorted(os.listdir(damaged)) if f.endswith(".mindrecord"))
    with open(damaged / shard, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(DataError, match=f"shard {shard} does not match its sha256"):
        PreparedCorpus(str(damaged))
    shutil.copy(bpe_dir / "bpe" / shard, damaged / shard)
    with open(damaged / (shard + ".db"), "ab") as fh:  # the index MindRecord reads the records' offsets from
        fh.write(b"\x00")
    with pytest.raises(DataError, match=f"shard {shard}.db does not match its sha256"):
        PreparedCorpus(str(damaged))
    os.remove(damaged / MANIFEST)  # as a preparation killed before its manifest leaves it
    with pytest.raises(DataError, match="no manifest.json: an interrupted preparation .*delete the folder and run "
                                        "prepare-data again"):
        PreparedCorpus(str(damaged))
    with pytest.raises(DataError, match="holds an interrupted preparation"):
        prepare(str(bpe_dir / "c.jsonl"), str(damaged), ["prose", "code"], SEQ, log=lambda line: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no manifest.json \\(not a prepare-data folder\\)"):
        PreparedCorpus(str(other))
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare(str(bpe_dir / "c.jsonl"), str(other), ["prose", "code"], SEQ, log=lambda line: None)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A tiny model trained 6 steps on a prepared byte corpus, checkpoint at step 3."""
    root = tmp_path_factory.mktemp("prepared_run")
    source = _jsonl(root / "c.jsonl", _corpus(80))
    prepare(source, str(root / "data"), ["prose", "code"], 32, val_fraction=0.2, log=lambda line: None)
    overrides = ("data.source=prepared", f"data.path={root / 'data'}", "train.steps=6", "train.eval_every=6",
                 "train.checkpoint_every=3", "parallel.dispatch=simulated", "parallel.devices_per_node=2")
    summary = Trainer(tiny_config(*overrides), str(root / "run"), log=lambda line: None).train()
    return root, overrides, summary


def test_training_on_prepared_shards_resumes_exactly(byte_run, tmp_path):
    root, overrides, summary = byte_run
    records = read(root / "run" / "metrics.jsonl")
    assert len(records) == 6 and records[-1]["lm_loss"] < records[0]["lm_loss"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / np.log(2))  # bytes: one byte a token
    resumed = tmp_path / "resumed"
    shutil.copytree(root / "run", resumed)
    remove(str(resumed / "checkpoints" / "step_000006"))
    os.remove(resumed / "summary.json")
    again = Trainer(tiny_config(*overrides), str(resumed), log=lambda line: None).train(resume=True)
    assert [r["loss"] for r in read(resumed / "metrics.jsonl")] == [r["loss"] for r in records]
    assert again["val_bpb"] == summary["val_bpb"]


def test_resume_refuses_data_prepared_again_with_another_tokenizer(tmp_path):
    data, docs = tmp_path / "data", _corpus()
    prepare(_jsonl(tmp_path / "a.jsonl", docs), str(data), ["prose", "code"], SEQ, tokenizer="bpe:300",
            val_fraction=0.2, log=lambda line: None)
    overrides = ("data.source=prepared", f"data.path={data}", "model.seq_len=16", "model.vocab_size=300",
                 "train.batch_size=2", "train.eval_every=2", "train.checkpoint_every=2")
    Trainer(tiny_config(*overrides, "train.steps=2"), str(tmp_path / "run"), log=lambda line: None).train()
    shutil.rmtree(data)  # the same folder prepared again: same vocabulary size, another tokenizer
    prepare(_jsonl(tmp_path / "b.jsonl", docs[::-1] + docs[:10]), str(data), ["prose", "code"], SEQ,
            tokenizer="bpe:300", val_fraction=0.2, log=lambda line: None)
    with pytest.raises(DataError, match=r"--resume: the run was trained with a bpe tokenizer of 300 ids \(\w{12}\), "
                                        r"the data's is a bpe tokenizer of 300 ids \(\w{12}\)"):
        Trainer(tiny_config(*overrides, "train.steps=4"), str(tmp_path / "run"), log=lambda line: None).train(True)
    with pytest.raises(DataError, match=r"generate: the run was trained with a bpe tokenizer"):
        generate.load_model(str(tmp_path / "run" / "checkpoints" / "step_000002"))


def test_bpe_runs_count_bits_per_byte_and_check_the_vocabulary(bpe_dir, tmp_path):
    overrides = ("data.source=prepared", f"data.path={bpe_dir / 'bpe'}", "model.seq_len=16")
    with pytest.raises(DataError, match=r"model.vocab_size = 256: must be at least 300"):
        Trainer(tiny_config(*overrides), str(tmp_path / "small"), log=lambda line: None)
    summary = Trainer(tiny_config(*overrides, "model.vocab_size=300", "train.steps=2", "train.eval_every=2",
                                  "train.checkpoint_every=2", "train.batch_size=2"),
                      str(tmp_path / "run"), log=lambda line: None).train()
    corpus = PreparedCorpus(str(bpe_dir / "bpe"))
    _, labels, _ = val_windows(corpus, 1024)
    scored = labels[:len(labels) // 2 * 2]
    bytes_per_token = corpus.tokenizer.token_bytes()[scored].sum() / scored.size
    assert bytes_per_token > 1.2  # BPE tokens span several bytes
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / np.log(2) / bytes_per_token, rel=1e-9)


def test_cli_prepare_data_prints_the_manifest_summary(tmp_path, capsys):
    source = _jsonl(tmp_path / "c.jsonl", _corpus(20))
    assert cli.main(["prepare-data", source, "--out", str(tmp_path / "out"), "--domains", "prose,code",
                     "--seq-len", "16", "--val-fraction", "0.25"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tokenizer"]["kind"] == "bytes" and printed["shards"] == 4
    assert cli.main(["prepare-data", source, "--out", str(tmp_path / "out"), "--domains", "prose,code",
                     "--seq-len", "16"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_each_rank_checks_the_validation_shards_and_those_of_its_own_share(tmp_path):
    """prose: 40 windows a file; with 2 ranks the last training file lies in rank 1's share only, and every rank
    reads the first validation windows, so rank 1 checks the first validation file too."""
    docs = [{"text": r["text"], "domain": "prose"} for r in _corpus(400) if r["domain"] == "prose"]
    prepare(_jsonl(tmp_path / "c.jsonl", docs), str(tmp_path / "out"), ["prose"], SEQ, val_fraction=0.1,
            shard_records=40, log=lambda line: None)
    corpus = PreparedCorpus(str(tmp_path / "out"))
    last = sorted((tmp_path / "out").glob("prose-train-*.mindrecord"))[-1]
    assert corpus.windows["prose", "train"] // 2 < corpus.windows["prose", "train"] - 40  # rank 1's share only
    assert corpus.windows["prose", "val"] > 2 * 40  # the first validation file lies in rank 0's half
    intact = last.read_bytes()
    last.write_bytes(intact[:-1])
    corpus.verify(ranks=[0], world=2)
    for ranks in ([1], None):
        with pytest.raises(DataError, match=f"shard {last.name} does not match its sha256"):
            corpus.verify(ranks=ranks, world=2)
    last.write_bytes(intact)
    val = sorted((tmp_path / "out").glob("prose-val-*.mindrecord"))[0]
    val.write_bytes(val.read_bytes() + b"\x00")
    for ranks in ([0], [1]):  # every rank reads the validation windows
        with pytest.raises(DataError, match=f"shard {val.name} does not match"):
            corpus.verify(ranks=ranks, world=2)


@pytest.mark.parametrize("mixture", ["uniform", "by_node", "bytes"])
def test_stream_positions_equal_replaying_every_earlier_sample(mixture):
    """4 ranks of 2 rows (B = 8, 2 devices a node), 3 domains, 37 steps; rows 2..5 (ranks 1 and 2). The bytes
    draws are counted in chunks of 3 steps (the last one partial)."""
    weights, layout = np.array([0.5, 0.3, 0.2]), (8, 4, 2)
    replayed = np.zeros((4, 3), np.int64)
    for step in range(37):
        for j in range(2, 6):
            replayed[j // 2, pipeline.sample_domain(step * 8 + j, mixture, 11, 3, weights, layout)] += 1
    got = prepared.stream_positions(37, range(2, 6), 8, 4, 3, mixture, lambda indices: pipeline.sample_domains(
        indices, mixture, 11, 3, weights, layout), chunk=12)
    np.testing.assert_array_equal(got, replayed)
    assert got.sum() == 37 * 4 and not got[[0, 3]].any() and (got > 0).sum() >= 2


def test_a_resume_at_step_100000_of_512_rows_positions_the_streams_without_replaying_them():
    """8 ranks of 64 rows, 2 devices a node, 4 domains: by_node gives rank r's 6.4 M windows to domain r // 2;
    uniform spreads each row evenly (B = 512 is a multiple of D = 4, so row j always draws domain j mod 4);
    bytes gives every rank 6.4 M windows in shares within 5 standard errors of the weights. Replaying the
    51.2 M samples one generator at a time took about half an hour."""
    weights = np.array([0.4, 0.3, 0.2, 0.1])
    positions = {mixture: prepared.stream_positions(100_000, range(512), 512, 8, 4, mixture, lambda i, m=mixture:
                                                    pipeline.sample_domains(i, m, 0, 4, weights, (512, 8, 2)))
                 for mixture in ("uniform", "by_node", "bytes")}
    by_node = np.zeros((8, 4), np.int64)
    by_node[np.arange(8), np.arange(8) // 2] = 6_400_000
    np.testing.assert_array_equal(positions["by_node"], by_node)
    np.testing.assert_array_equal(positions["uniform"], np.full((8, 4), 1_600_000))
    drawn = positions["bytes"]
    assert (drawn.sum(1) == 6_400_000).all()
    np.testing.assert_allclose(drawn / 6_400_000, np.tile(weights, (8, 1)), atol=5 * 0.5 / 6_400_000 ** 0.5)


def test_the_bytes_mixture_is_a_pure_function_of_seed_and_sample():
    """SplitMix64's known first output; the first draws of seed 0 (a change to them changes every `bytes` run's
    data); many samples at once, in any order, the same domains; another seed, other domains; a domain of weight
    0 is never drawn and the shares follow the weights."""
    weights = np.array([0.25, 0.0, 0.75])
    indices = np.arange(40_000, dtype=np.int64)
    many = pipeline.sample_domains(indices, "bytes", 5, 3, weights)
    shuffled = np.random.default_rng(0).permutation(indices)
    np.testing.assert_array_equal(pipeline.sample_domains(shuffled, "bytes", 5, 3, weights), many[shuffled])
    assert hex(pipeline._splitmix64(np.array([0], np.uint64))[0]) == "0xe220a8397b1dcdaf"  # SplitMix64's first output
    # seed 0's first draws: SplitMix64(key + i) >> 11 as a fraction of 2^53 against the cumulative weights
    assert pipeline.sample_domains(np.arange(12), "bytes", 0, 4, np.array([0.4, 0.3, 0.2, 0.1])).tolist() == \
        [1, 0, 1, 3, 0, 0, 3, 0, 1, 3, 1, 1]
    assert (pipeline.sample_domains(indices, "bytes", 6, 3, weights) != many).mean() > 0.3
    assert not (many == 1).any() and abs((many == 2).mean() - 0.75) < 0.01


def test_the_bpe_trains_on_a_seeded_sample_of_the_documents(tmp_path, monkeypatch):
    """A sample of 0.002 MB of a ~9 KB corpus: about a fifth of the documents reach the trainer, the same ones for
    the same seed; a sample larger than the corpus is the whole corpus."""
    source = _jsonl(tmp_path / "c.jsonl", _corpus(120))
    size = os.path.getsize(source)
    seen, train = [], BpeTokenizer.train

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.append(texts)
        return train(iter(texts), vocab_size)
    monkeypatch.setattr(BpeTokenizer, "train", staticmethod(spy))
    runs = [prepare(source, str(tmp_path / f"out{i}"), ["prose", "code"], SEQ, tokenizer="bpe:280", val_fraction=0.2,
                    log=lambda line: None, bpe_sample_mb=mb, seed=seed)
            for i, (mb, seed) in enumerate(((0.002, 0), (0.002, 0), (0.002, 1), (1.0, 0)))]
    sample, again, other, whole = seen
    assert sample == again and sample != other and len(whole) == 120
    assert 0.1 < len(sample) / 120 < 0.35 and 2000 / size == pytest.approx(runs[0]["bpe_sample"]["share"])
    assert set(sample) <= set(whole) and runs[0]["tokenizer"]["identity"] == runs[1]["tokenizer"]["identity"]
    assert runs[3]["bpe_sample"] == {"share": 1.0, "seed": 0}


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    """BPE, 3 files a split (60 windows each), 300 documents in chunks of 64: the manifests and every file agree."""
    source = _jsonl(tmp_path / "c.jsonl", _corpus(300))
    manifests = [prepare(source, str(tmp_path / f"w{n}"), ["prose", "code"], SEQ, tokenizer="bpe:300",
                         val_fraction=0.2, shard_records=60, log=lambda line: None, workers=n) for n in (1, 2)]
    assert manifests[0] == manifests[1] and len(manifests[0]["shards"]) > 4
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w2"))
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
