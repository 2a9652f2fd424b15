"""`data.tokenizer: bpe:<V>` on an in-memory corpus: trained when the run starts, kept in the run directory, read
back by --resume, eval, generate and ckpt convert."""
import json

import numpy as np
import pytest

from pangu_moe import cli, generate
from pangu_moe.config import ConfigError
from pangu_moe.data.corpus import DataError, DomainText, load_corpus
from pangu_moe.data.prepare import TOKENIZER_FILE
from pangu_moe.data.source import RunData, bpe_domains, run_tokenizer
from pangu_moe.data.tokenizer import BpeTokenizer
from pangu_moe.train import checkpoint, convert
from pangu_moe.train.metrics import read
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

BPE = ("data.tokenizer=bpe:320", "model.vocab_size=320", "train.eval_every=4", "train.checkpoint_every=2")


@pytest.mark.parametrize("overrides,message", [
    (("data.tokenizer=bpe",), "data.tokenizer = 'bpe': must be bytes or bpe:<V> with V > 256 (e.g. bpe:1024)"),
    (("data.tokenizer=bpe:256",), "data.tokenizer = 'bpe:256': must be bytes or bpe:<V> with V > 256"),
    (("data.tokenizer=bpe:320",), "model.vocab_size = 256: must be >= 320, the vocabulary of data.tokenizer=bpe:320"),
])
def test_bad_tokenizer_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        tiny_config(*overrides)


def test_a_prepared_source_uses_its_own_tokenizer_whatever_data_tokenizer_says():
    cfg = tiny_config("data.tokenizer=bpe:320", "data.source=prepared", "data.path=x")  # model.vocab_size 256
    assert cfg.data.tokenizer == "bpe:320"  # accepted: the corpus's manifest decides (`PreparedCorpus.check`)


def test_the_domains_are_encoded_with_a_bpe_trained_on_the_training_split():
    cfg = tiny_config(*BPE)
    raw = load_corpus(cfg.data, cfg.model.seq_len)
    data = RunData(cfg)
    assert isinstance(data.tokenizer, BpeTokenizer) and data.tokenizer.vocab_size == 320
    for before, after in zip(raw, data.domains):  # the token ids decode to the byte text, split by split
        assert data.tokenizer.decode(after.train) == bytes(before.train).decode("utf-8", "ignore")
        assert data.tokenizer.decode(after.val) == bytes(before.val).decode("utf-8", "ignore")
        assert len(after.train) < 0.8 * len(before.train)  # merges: fewer tokens than bytes
    # Training again gives the same tokenizer: every msrun process trains its own and they must agree.
    assert bpe_domains(raw, 320, cfg.model.seq_len)[0].identity == data.tokenizer.identity
    # The same tokenizer given back encodes the same ids (what --resume and eval do).
    again = bpe_domains(raw, 320, cfg.model.seq_len, data.tokenizer)[1]
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) for a, b in zip(again, data.domains))


def test_bpe_pieces_are_the_bytes_of_each_token():
    from tokenizers import pre_tokenizers
    from pangu_moe.data.tokenizer import byte_level_alphabet
    assert sorted(byte_level_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = BpeTokenizer.train(["Grüße 日本語 🚀🙂 naïve café\tend " * 20], 300)
    text = "déjà vu 日本 🚀 x\ty"
    ids = tok.encode(text)
    assert b"".join(tok.piece(i) for i in ids) == text.encode()
    assert [len(tok.piece(i)) for i in range(tok.vocab_size)] == tok.token_bytes().tolist()


def test_a_domain_too_short_in_tokens_is_refused():
    text = np.frombuffer(("abc " * 12).encode(), np.uint8)  # 48 bytes, about 12 tokens
    with pytest.raises(DataError, match=r"domain 'prose' has \d+ training and \d+ validation BPE tokens; need at "
                                        r"least 33 \(model.seq_len \+ 1\) in each"):
        bpe_domains([DomainText("prose", text, text)], 300, 32)


def test_a_bpe_run_resumes_exactly_and_serves_eval_generate_and_convert(tmp_path, capsys):
    whole = Trainer(tiny_config(*BPE, "train.steps=4"), str(tmp_path / "whole"), log=lambda line: None).train()
    run = tmp_path / "run"
    Trainer(tiny_config(*BPE, "train.steps=2"), str(run), log=lambda line: None).train()
    saved = BpeTokenizer.load(run / TOKENIZER_FILE)
    resumed = Trainer(tiny_config(*BPE, "train.steps=4"), str(run), log=lambda line: None)
    assert resumed.data.tokenizer.identity == saved.identity  # read back, not trained again
    assert resumed.train(resume=True)["val_bpb"] == whole["val_bpb"]
    assert [r["loss"] for r in read(run / "metrics.jsonl")] == [r["loss"] for r in read(tmp_path / "whole" /
                                                                                         "metrics.jsonl")]
    assert whole["val_bpb"] < whole["val_loss"] / np.log(2)  # BPE tokens hold more than one byte each

    folder = str(run / "checkpoints" / "step_000004")
    assert cli.main(["eval", "--checkpoint", str(run)]) == 0  # a run directory: its newest checkpoint
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["val_bpb"] == pytest.approx(whole["val_bpb"],
                                                                                              rel=1e-6)
    cfg, model, tok = generate.load_model(folder)
    assert tok.identity == saved.identity
    ids, trace = generate.generate(cfg, model, tok, "déjà vu 日本", "prose", 6, 1.0, 0, seed=2)
    pieces = [len(tok.piece(i)) for i in ids]  # --max-bytes counts UTF-8 bytes: stop at the token that reaches 6
    assert sum(pieces) >= 6 and sum(pieces[:-1]) < 6 and all(0 <= i < 320 for i in ids)
    text = bytes(b for piece in trace["token_bytes"] for b in piece)  # the trace holds each token's bytes
    assert text.startswith("déjà vu 日本".encode()) and text.decode("utf-8", "replace") == \
        "déjà vu 日本" + tok.decode(ids)

    out = convert.reshard(folder, str(tmp_path / "ep2"), ep=2)
    assert run_tokenizer(cfg, checkpoint.run_dir_of(out)).identity == saved.identity
    (run / TOKENIZER_FILE).unlink()
    with pytest.raises(DataError, match=r"no tokenizer.json; a run with data.tokenizer = bpe:320 writes the BPE"):
        generate.load_model(folder)
