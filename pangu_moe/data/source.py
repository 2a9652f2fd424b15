"""The data a run trains on, whatever `data.source`: batches, validation windows and the tokenizer."""
from pangu_moe.data import pipeline, prepared
from pangu_moe.data.corpus import load_corpus
from pangu_moe.data.tokenizer import ByteTokenizer


def run_tokenizer(cfg):
    """The tokenizer of a run's data (`data.source`): bytes, or a prepared corpus's (shards not re-checked)."""
    if cfg.data.source == "prepared":
        return prepared.PreparedCorpus(cfg.data.path, verify=False).tokenizer
    return ByteTokenizer()


class RunData:
    """In-memory byte corpora (`demo`, `jsonl`, `folders`) or a prepared corpus (`prepared`, streamed).

    Args: cfg: the RunConfig; verify: check a prepared corpus's shard checksums (reads every shard once).
    Raises DataError with one line.
    """

    def __init__(self, cfg, verify=True):
        self.cfg = cfg
        if cfg.data.source == "prepared":
            self.corpus = prepared.PreparedCorpus(cfg.data.path, verify)
            self.corpus.check(cfg.model, cfg.data)
            self.tokenizer = self.corpus.tokenizer
        else:
            self.corpus = None
            self.domains = load_corpus(cfg.data, cfg.model.seq_len)
            self.tokenizer = ByteTokenizer()

    def batches(self, start_step, world, devices_per_node):
        """The global batches (input_ids, labels, domain_ids) numpy int32 [B, S] of steps start_step..train.steps-1."""
        c = self.cfg
        t = c.train
        if self.corpus is not None:
            return prepared.train_batches(self.corpus, t.batch_size, c.runtime.seed, start_step, t.steps,
                                          c.data.mixture, world, devices_per_node)
        return pipeline.train_batches(self.domains, c.model.seq_len, t.batch_size, c.runtime.seed, start_step, t.steps,
                                      c.data.mixture, world, devices_per_node)

    def val_windows(self):
        """(input_ids, labels, domain_ids) int32 [N, S], balanced over the domains."""
        if self.corpus is not None:
            return prepared.val_windows(self.corpus, self.cfg.data.max_val_windows)
        return pipeline.val_windows(self.domains, self.cfg.model.seq_len)
