"""The data a run trains on, whatever `data.source`: batches, validation windows and the tokenizer."""
import json
import os

from pangu_moe.data import pipeline, prepared
from pangu_moe.data.corpus import DataError, load_corpus
from pangu_moe.data.tokenizer import ByteTokenizer

TOKENIZER_RECORD = "tokenizer_identity.json"  # in a run directory: the tokenizer the run trains with


def record_tokenizer(run_dir, tokenizer):
    """Write `TOKENIZER_RECORD` into `run_dir`."""
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


def run_tokenizer(cfg):
    """The tokenizer of a run's data (`data.source`): bytes, or a prepared corpus's (shards not re-checked)."""
    if cfg.data.source == "prepared":
        return prepared.PreparedCorpus(cfg.data.path, verify=False).tokenizer
    return ByteTokenizer()


class RunData:
    """In-memory byte corpora (`demo`, `jsonl`, `folders`) or a prepared corpus (`prepared`, streamed).

    Args: cfg: the RunConfig; verify: check a prepared corpus's shard checksums now (reads every shard once;
        training does it with `verify` before its first step).
    Raises DataError with one line.
    """

    def __init__(self, cfg, verify=False):
        self.cfg = cfg
        if cfg.data.source == "prepared":
            self.corpus = prepared.PreparedCorpus(cfg.data.path, verify)
            self.corpus.check(cfg.model, cfg.data)
            self.tokenizer = self.corpus.tokenizer
        else:
            self.corpus = None
            self.domains = load_corpus(cfg.data, cfg.model.seq_len)
            self.tokenizer = ByteTokenizer()

    def verify(self):
        """Check a prepared corpus's shards against their checksums (nothing to check for in-memory data)."""
        if self.corpus is not None:
            self.corpus.verify()

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
