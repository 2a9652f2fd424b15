"""The data a run trains on, whatever `data.source`: batches, validation windows and the tokenizer."""
import json
import os

from pangu_moe.config import bpe_vocab_size, fit_domains
from pangu_moe.data import pipeline, prepared
from pangu_moe.data.corpus import DataError, DomainText, load_corpus
from pangu_moe.data.prepare import TOKENIZER_FILE
from pangu_moe.data.tokenizer import BpeTokenizer, ByteTokenizer

TOKENIZER_RECORD = "tokenizer_identity.json"  # in a run directory: the tokenizer the run trains with
RUN_FILES = (TOKENIZER_RECORD, TOKENIZER_FILE)  # a run directory's tokenizer files, if it has them


def record_tokenizer(run_dir, tokenizer):
    """Write `TOKENIZER_RECORD` into `run_dir`, and a BPE trained by the run (`data.tokenizer: bpe:<V>`) as
    `TOKENIZER_FILE`, which evaluation, generation and --resume read back."""
    if tokenizer.kind == "bpe":
        tokenizer.save(os.path.join(run_dir, TOKENIZER_FILE))
    with open(os.path.join(run_dir, TOKENIZER_RECORD), "w", encoding="utf-8") as fh:
        json.dump({"kind": tokenizer.kind, "identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size}, fh)


def check_tokenizer(run_dir, tokenizer, command):
    """Refuse (DataError naming `command`) to use a run whose recorded tokenizer (`TOKENIZER_RECORD`) is not the
    data's `tokenizer`: the checkpoint's embeddings index another vocabulary (e.g. data.path was prepared
    again). A run directory without the record (older runs, converted checkpoints) is not checked."""
    path = os.path.join(run_dir, TOKENIZER_RECORD)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        recorded = json.load(fh)
    if recorded["identity"] != tokenizer.identity:
        raise DataError(f"{command}: the run was trained with a {recorded['kind']} tokenizer of "
                        f"{recorded['vocab_size']} ids ({recorded['identity'][:12]}), the data's is a {tokenizer.kind} "
                        f"tokenizer of {tokenizer.vocab_size} ids ({tokenizer.identity[:12]}); use the data it was "
                        f"trained on")


def run_tokenizer(cfg, run_dir):
    """The tokenizer of run `run_dir` (trained on `cfg.data`): bytes, a prepared corpus's (shards not re-checked), or
    the BPE the run trained (its `TOKENIZER_FILE`). Raises DataError if that file is missing."""
    if cfg.data.source == "prepared":
        return prepared.PreparedCorpus(cfg.data.path, verify=False).tokenizer
    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    path = os.path.join(run_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise DataError(f"run directory {run_dir}: no {TOKENIZER_FILE}; a run with data.tokenizer = "
                        f"{cfg.data.tokenizer} writes the BPE it trained there when it starts")
    return BpeTokenizer.load(path)


def bpe_domains(domains, vocab_size, seq_len, tokenizer=None):
    """`domains` ([DomainText] of bytes) encoded with a byte-level BPE: `tokenizer`, or one of `vocab_size` ids
    trained on their training text. Returns (the tokenizer, [DomainText] of int32 token ids).

    A domain's text was cut at `data.max_bytes_per_domain` bytes, possibly inside a character: the bytes of that
    one cut character are left out (every other byte is valid UTF-8, read from str documents).
    Raises DataError if a split has fewer than seq_len + 1 tokens.
    """
    texts = [[bytes(split).decode("utf-8", "ignore") for split in (d.train, d.val)] for d in domains]
    tokenizer = tokenizer or BpeTokenizer.train((train for train, _ in texts), vocab_size)
    encoded = []
    for d, splits in zip(domains, texts):
        train, val = (tokenizer.encode(text) for text in splits)
        if min(len(train), len(val)) <= seq_len:
            raise DataError(f"domain {d.name!r} has {len(train)} training and {len(val)} validation BPE tokens; need "
                            f"at least {seq_len + 1} (model.seq_len + 1) in each")
        encoded.append(DomainText(d.name, train, val))
    return tokenizer, encoded


class RunData:
    """In-memory corpora (`demo`, `jsonl`, `folders`; bytes or a BPE, `data.tokenizer`) or a prepared corpus
    (`prepared`, streamed).

    Args: cfg: the RunConfig; verify: check every shard of a prepared corpus against its checksum now (the
        trainer checks only the shards its process reads, with `verify`, before reading any); run_dir: a run
        directory holding the BPE of an in-memory `bpe:<V>` run (`record_tokenizer`), used instead of training
        one (resume, eval).
    Raises DataError with one line.
    """

    def __init__(self, cfg, verify=False, run_dir=None):
        self.cfg = cfg
        if cfg.data.source == "prepared":
            self.corpus = prepared.PreparedCorpus(cfg.data.path, verify)
            if list(cfg.data.domains) != self.corpus.domains:
                fit = fit_domains(cfg.to_dict(), self.corpus.domains)
                raise DataError(f"data.domains = {list(cfg.data.domains)}: must be {self.corpus.domains}, the domains "
                                f"of {cfg.data.path}" + (f"; with them these settings work together: {fit}" if fit
                                                         else ""))
            self.corpus.check(cfg.model, cfg.data)
            self.tokenizer = self.corpus.tokenizer
        else:
            self.corpus = None
            self.domains = load_corpus(cfg.data, cfg.model.seq_len)
            self.tokenizer = ByteTokenizer()
            vocab_size = bpe_vocab_size(cfg.data.tokenizer)
            if vocab_size:
                trained = run_dir and os.path.isfile(os.path.join(run_dir, TOKENIZER_FILE))
                self.tokenizer, self.domains = bpe_domains(self.domains, vocab_size, cfg.model.seq_len,
                                                           run_tokenizer(cfg, run_dir) if trained else None)

    def verify(self, ranks=None, world=1):
        """Check a prepared corpus's shards against their checksums before they are read (nothing to check for
        in-memory data): the validation shards and the training shards holding the shares of `ranks` of `world`
        (None: every shard)."""
        if self.corpus is not None:
            self.corpus.verify(ranks, world)

    def batches(self, start_step, world, devices_per_node, rows=None):
        """Batches (input_ids, labels, domain_ids) numpy int32 [b, S] of steps start_step..train.steps-1: the rows
        `rows` (a slice, default all B) of each global batch, built without reading the others."""
        c = self.cfg
        t = c.train
        if self.corpus is not None:
            return prepared.train_batches(self.corpus, t.batch_size, c.runtime.seed, start_step, t.steps,
                                          c.data.mixture, world, devices_per_node, rows)
        return pipeline.train_batches(self.domains, c.model.seq_len, t.batch_size, c.runtime.seed, start_step, t.steps,
                                      c.data.mixture, world, devices_per_node, rows)

    def val_windows(self):
        """(input_ids, labels, domain_ids) int32 [N, S], balanced over the domains."""
        if self.corpus is not None:
            return prepared.val_windows(self.corpus, self.cfg.data.max_val_windows)
        return pipeline.val_windows(self.domains, self.cfg.model.seq_len)
