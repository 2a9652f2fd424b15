"""Batches for training and evaluation, through `mindspore.dataset`.

Training sample i is a pure function of (seed, i): its domain, then a uniformly random window of
seq_len + 1 bytes of that domain's training text. With the `uniform` mixture the domain of sample i
is i mod D, so every batch whose size is a multiple of D holds each domain equally often and the
level-1 expert groups see equal load in every step (a random draw would let one group overflow its
capacity whenever a batch happens to hold more of its domain). With `bytes` the domain is drawn in
proportion to each domain's training text. So a resumed run that starts at sample
step * B sees exactly the batches of an uninterrupted run.
"""
import numpy as np
import mindspore.dataset as ds

COLUMNS = ["input_ids", "labels", "domain_ids"]


class TrainWindows:
    """Random-access source of training windows.

    Args:
        domains: [DomainText]; seq_len: S; seed: int; start: index of the first sample; count: samples;
        mixture: "uniform" or "bytes".
    Item i: (input_ids [S] int32, labels [S] int32, domain_ids [S] int32).
    """

    def __init__(self, domains, seq_len, seed, start, count, mixture):
        self.texts = [d.train for d in domains]
        sizes = np.array([len(t) for t in self.texts], np.float64)
        self.weights = sizes / sizes.sum()
        self.mixture = mixture
        self.seq_len, self.seed, self.start, self.count = seq_len, seed, start, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        index = self.start + int(i)
        rng = np.random.default_rng((self.seed, index))
        if self.mixture == "uniform":
            domain = index % len(self.texts)
        else:
            domain = int(rng.choice(len(self.texts), p=self.weights))
        text = self.texts[domain]
        begin = int(rng.integers(0, len(text) - self.seq_len))
        window = text[begin:begin + self.seq_len + 1].astype(np.int32)
        return window[:-1], window[1:], np.full(self.seq_len, domain, np.int32)


def val_windows(domains, seq_len):
    """Every non-overlapping window of each domain's validation text, round-robin over domains.

    Returns: (input_ids [N, S], labels [N, S], domain_ids [N, S]) int32 arrays.
    """
    per_domain = []
    for d, dom in enumerate(domains):
        n = (len(dom.val) - 1) // seq_len
        rows = np.stack([dom.val[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)
        per_domain.append([(r, d) for r in rows])
    order = [item for group in _round_robin(per_domain) for item in group]
    windows = np.stack([r for r, _ in order])
    domain_ids = np.repeat(np.array([d for _, d in order], np.int32)[:, None], seq_len, 1)
    return windows[:, :-1], windows[:, 1:], domain_ids


def _round_robin(lists):
    longest = max(len(x) for x in lists)
    for i in range(longest):
        yield [x[i] for x in lists if i < len(x)]


def train_batches(domains, seq_len, batch_size, seed, start_step, steps, mixture):
    """Iterator of numpy batches (input_ids, labels, domain_ids) [B, S] for steps start_step..steps-1."""
    source = TrainWindows(domains, seq_len, seed, start_step * batch_size, (steps - start_step) * batch_size,
                          mixture)
    dataset = ds.GeneratorDataset(source, column_names=COLUMNS, shuffle=False, num_parallel_workers=1)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)


def unigram_bpb(domains):
    """Entropy in bits of the byte-unigram distribution of all validation text."""
    counts = np.zeros(256, np.float64)
    for d in domains:
        counts += np.bincount(d.val, minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
