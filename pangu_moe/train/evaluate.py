"""Validation loss per token and bits per byte over the balanced validation windows."""
import math

import numpy as np
from mindspore import Tensor

from pangu_moe.config import ConfigError


class Evaluator:
    """Scores whole batches of validation windows with an eval step.

    Bits per byte divide the summed loss by the UTF-8 bytes of the scored tokens (`token_bytes`), so runs
    with different tokenizers compare; with the byte tokenizer they equal bits per token.

    Args:
        windows: (input_ids, labels, domain_ids) int32 [N, S] (`pipeline.val_windows`, `prepared.val_windows`);
        names: domain names by id; batch_size: B; eval_step: from `steps.make_eval_step`;
        rows: the rows of each batch this process feeds to `eval_step` (one rank's, under expert
            parallelism with a rank per process; the step returns every rank's sums);
        token_bytes: int [V], the UTF-8 bytes of each token id (the tokenizer's `token_bytes`).
    """

    def __init__(self, windows, names, batch_size, eval_step, rows, token_bytes):
        self.names = list(names)
        self.inputs, self.labels, self.domain_ids = windows
        self.token_bytes = np.asarray(token_bytes)
        self.batch_size, self.eval_step, self.rows = batch_size, eval_step, rows
        self.num_batches = len(self.inputs) // batch_size
        if self.num_batches == 0:
            raise ConfigError(f"train.batch_size = {batch_size}: must be at most the {len(self.inputs)} validation "
                              f"windows (raise data.val_fraction or lower the batch size)")

    def scored_labels(self, max_batches=None):
        """The bytes that `evaluate(max_batches)` scores: labels [N, S]."""
        return self.labels[:self._batches(max_batches) * self.batch_size]

    def _batches(self, max_batches):
        return self.num_batches if max_batches is None else min(self.num_batches, max_batches)

    def evaluate(self, max_batches=None, progress=None):
        """Score the first `max_batches` batches (all by default); `progress`: callable(done, total) per batch.

        Returns: {"val_loss": nats per token, "val_bpb": bits per UTF-8 byte,
                  "val_bpb_per_domain": {domain name: bits per byte}}.
        """
        n = self._batches(max_batches) * self.batch_size
        parts = []
        for i in range(0, n, self.batch_size):
            parts.append(self.eval_step(*(Tensor(a[i:i + self.batch_size][self.rows])
                                          for a in (self.inputs, self.labels, self.domain_ids))).asnumpy())
            if progress:
                progress(len(parts), n // self.batch_size)
        sums = np.concatenate(parts).astype(np.float64)  # (N,) summed nats per window
        window_bytes = self.token_bytes[self.labels[:n]].sum(1).astype(np.float64)  # (N,) UTF-8 bytes scored
        window_domain = self.domain_ids[:n, 0]
        per_domain = {name: float(sums[window_domain == d].sum() / window_bytes[window_domain == d].sum() / math.log(2))
                      for d, name in enumerate(self.names) if (window_domain == d).any()}
        return {"val_loss": float(sums.sum() / self.labels[:n].size),
                "val_bpb": float(sums.sum() / window_bytes.sum() / math.log(2)), "val_bpb_per_domain": per_domain}
