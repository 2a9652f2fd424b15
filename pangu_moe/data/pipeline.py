"""Batches for training and evaluation, through `mindspore.dataset`.

Training sample i is a pure function of (seed, i): its domain, then a uniformly random window of
seq_len + 1 bytes of that domain's training text. With the `uniform` mixture the domain of sample i
is i mod D, so every batch whose size is a multiple of D holds each domain equally often and the
level-1 expert groups see equal load in every step (a random draw would let one group overflow its
capacity whenever a batch happens to hold more of its domain). With `bytes` the domain is drawn in
proportion to each domain's training text. With `by_node` every node's ranks hold one domain (node n
holds domain n mod D; the batch's B/W-sequence blocks are the ranks): the layout of PanGu-Σ, where a
domain trains on the devices hosting its experts, and the only layout in which a router can learn to
prefer a rank's local experts (with every rank holding the same mix, nothing in a token tells the
shared router where it is). Either way a resumed run that starts at sample step * B sees exactly the
batches of an uninterrupted run.
"""
import numpy as np
import mindspore.dataset as ds

COLUMNS = ["input_ids", "labels", "domain_ids"]


# SplitMix64 (Steele, Lea and Flood 2014): a counter-based draw, so the domains of many samples are computed at
# once in numpy (a resume counts the 51 M samples of 100,000 steps of 512 rows in seconds, not half an hour).
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x):
    """uint64 [n] -> uint64 [n]: SplitMix64's output function of counter values x (wrapping arithmetic)."""
    x = x + np.uint64(_GAMMA)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def sample_domains(indices, mixture, seed, num_domains, weights=None, layout=(1, 1, 1)):
    """The domains of training samples `indices` (module doc).

    Args: indices: int64 [n] sample indices; mixture: "uniform", "bytes" or "by_node"; weights: [D] domain
        probabilities of "bytes"; layout: (batch_size B, ranks W, devices_per_node D) of "by_node".
    Returns: int64 [n]. With "bytes", sample i draws u = SplitMix64(SplitMix64(seed) + i) / 2^64 and takes the
        first domain whose cumulative weight exceeds u: a pure function of (seed, i).
    """
    indices = np.asarray(indices, np.int64)
    if mixture == "bytes":
        key = _splitmix64(np.array([seed % 2**64], np.uint64))[0]
        u = (_splitmix64(indices.astype(np.uint64) + key) >> np.uint64(11)) * 2.0 ** -53  # [0, 1), 53 bits
        return np.searchsorted(np.cumsum(weights)[:-1], u, side="right").astype(np.int64)
    if mixture == "by_node":
        batch_size, ranks, devices_per_node = layout
        return (indices % batch_size) // (batch_size // ranks) // devices_per_node % num_domains
    return indices % num_domains


def sample_domain(index, mixture, seed, num_domains, weights=None, layout=(1, 1, 1)):
    """`sample_domains` of the one sample `index`: int."""
    return int(sample_domains([index], mixture, seed, num_domains, weights, layout)[0])


class TrainWindows:
    """Random-access source of training windows: rows `rows` of the global batches of `count` samples from
    sample `start` (a multiple of B).

    Args:
        domains: [DomainText]; seq_len: S; seed: int; start: index of the first sample; count: samples;
        mixture: "uniform", "bytes" or "by_node";
        layout: (batch_size B, ranks W, devices_per_node D), used by "by_node" and by `rows`;
        rows: a slice of each global batch's B rows (default all).
    Item i: (input_ids [S] int32, labels [S] int32, domain_ids [S] int32).
    """

    def __init__(self, domains, seq_len, seed, start, count, mixture, layout=(1, 1, 1), rows=None):
        self.texts = [d.train for d in domains]
        sizes = np.array([len(t) for t in self.texts], np.float64)
        self.weights = sizes / sizes.sum() if mixture == "bytes" else None
        self.mixture, self.layout = mixture, layout
        self.seq_len, self.seed, self.start = seq_len, seed, start
        self.rows = range(layout[0])[rows or slice(None)]
        self.count = count // layout[0] * len(self.rows)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        batch, row = divmod(int(i), len(self.rows))
        index = self.start + batch * self.layout[0] + self.rows[row]
        domain = sample_domain(index, self.mixture, self.seed, len(self.texts), self.weights, self.layout)
        text = self.texts[domain]
        begin = int(np.random.default_rng((self.seed, index)).integers(0, len(text) - self.seq_len))
        window = text[begin:begin + self.seq_len + 1].astype(np.int32)
        return window[:-1], window[1:], np.full(self.seq_len, domain, np.int32)


def val_windows(domains, seq_len):
    """Validation windows, the same number from every domain, interleaved domain by domain.

    Each domain's validation text is cut into non-overlapping windows of seq_len + 1 bytes; every
    domain contributes n = (fewest windows of any domain) of them, spread evenly over its text. The
    set is balanced like the `uniform` training mixture, and any run of len(domains) consecutive
    windows holds every domain once, so evaluation batches load the level-1 groups equally.

    Returns: (input_ids [N, S], labels [N, S], domain_ids [N, S]) int32 arrays, N = n * len(domains).
    """
    counts = [(len(d.val) - 1) // seq_len for d in domains]
    n = min(counts)
    rows = []
    for count, dom in zip(counts, domains):
        starts = np.linspace(0, count - 1, n).round().astype(np.int64) * seq_len
        rows.append(np.stack([dom.val[s:s + seq_len + 1] for s in starts]).astype(np.int32))
    return interleave(rows)


def interleave(per_domain):
    """Validation windows of every domain, n each (a list over domains of int32 [n, S + 1]), interleaved domain
    by domain -> (input_ids [N, S], labels [N, S], domain_ids [N, S]) int32, N = n * D."""
    n, width = per_domain[0].shape
    windows = np.stack(per_domain, 1).reshape(n * len(per_domain), width)  # (n*D, S+1) <- (n, D, S+1)
    domain_ids = np.tile(np.arange(len(per_domain), dtype=np.int32), n)
    domain_ids = np.repeat(domain_ids[:, None], width - 1, 1)  # (N, S)
    return windows[:, :-1], windows[:, 1:], domain_ids


def train_batches(domains, seq_len, batch_size, seed, start_step, steps, mixture, ranks=1, devices_per_node=1,
                  rows=None):
    """Iterator of numpy batches (input_ids, labels, domain_ids) int32 [b, S] for steps start_step..steps-1: the
    rows `rows` (a slice of the B rows, default all) of each global batch.

    `ranks` W and `devices_per_node` D place the domains for the "by_node" mixture."""
    source = TrainWindows(domains, seq_len, seed, start_step * batch_size, (steps - start_step) * batch_size,
                          mixture, (batch_size, ranks, devices_per_node), rows)
    dataset = ds.GeneratorDataset(source, column_names=COLUMNS, shuffle=False, num_parallel_workers=1)
    dataset = dataset.batch(len(source.rows), drop_remainder=True)
    return dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)


def unigram_bpb(labels, token_bytes=None):
    """Bits per byte of the token-unigram model of the scored tokens (labels [N, S]): their unigram entropy
    in bits per token, over the UTF-8 bytes per token (`token_bytes` [V] from the tokenizer; 1 for bytes)."""
    labels = np.asarray(labels).ravel()
    counts = np.bincount(labels, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    bits_per_token = float(-(p * np.log2(p)).sum())
    if token_bytes is None:
        return bits_per_token
    return bits_per_token / (float(np.asarray(token_bytes)[labels].sum()) / len(labels))  # exact for bytes


def byte_unigram_bpb(labels, pieces):
    """Bits per byte of the byte-unigram model of the UTF-8 text of the scored tokens (labels [N, S]): the entropy
    of its byte frequencies. `pieces`: the bytes of each token id (the tokenizer's `piece`). It does not depend on
    the tokenizer, so it is a baseline runs of different tokenizers share; with bytes it is `unigram_bpb`."""
    tokens = np.bincount(np.asarray(labels).ravel(), minlength=len(pieces))
    counts = np.zeros(256, np.float64)
    for token in np.nonzero(tokens)[0]:  # only the tokens the text holds
        counts += tokens[token] * np.bincount(np.frombuffer(pieces[token], np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
