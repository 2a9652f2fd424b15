"""Training and validation windows from a prepared corpus (`data.prepare`), read from its MindRecord shards.

Nothing holds the corpus in memory: a batch reads its windows through `mindspore.dataset.MindDataset`
in blocks of `BLOCK` windows (the records holding them, `prepare.WINDOWS_PER_RECORD` windows each).

Training order. Rank r of W owns the contiguous share [r·n, (r+1)·n) of each domain's n·W (+ a remainder
no rank reads) training windows, so the ranks' data are disjoint. It reads its share in epochs; epoch e
visits the share's blocks of `BLOCK` windows in a permutation drawn from (seed, domain, rank, e), and
each block's windows in a permutation drawn from (seed, domain, rank, e, block). Row j of the global
batch of step s is sample i = s·B + j: its domain comes from the mixture (`pipeline.sample_domains`, as
for in-memory corpora) and its window is the next one of that domain in rank j // (B/W)'s order. The
position of every (rank, domain) stream is a function of the step, so a resumed run reads exactly the
windows of an uninterrupted one.

A process builds only its own rows (`rows`): it reads the streams of the ranks it holds and no other rank's
share.
"""
import json
import os

import numpy as np

from pangu_moe.config import one_line
from pangu_moe.data.corpus import DataError
from pangu_moe.data.pipeline import interleave, sample_domains
from pangu_moe.data.prepare import FORMAT, MANIFEST, TOKENIZER_FILE, manifest_digest, sha256_file
from pangu_moe.data.tokenizer import BYTES, BpeTokenizer, ByteTokenizer

BLOCK = 256  # windows read at once; also the unit of the epoch shuffle
MANIFEST_FIELDS = ("seq_len", "domains", "windows_per_record", "tokenizer", "counts", "shards")


def _read_manifest(path, manifest_path):
    """The manifest dict of prepared corpus `path`; DataError with one line when it is not JSON, another format,
    or edited since prepare-data wrote it (its `manifest_sha256`; manifests written before it carried one are
    checked for their fields only)."""
    again = "prepare the corpus again with pangu-moe prepare-data (it writes a new --out folder)"
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"data.path {path}: {MANIFEST} is not valid JSON ({one_line(e)}): truncated or "
                        f"edited; {again}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataError(f"data.path {path}: {MANIFEST} has format {found!r}; this version reads format {FORMAT}")
    if "manifest_sha256" in m and m["manifest_sha256"] != manifest_digest(m):
        raise DataError(f"data.path {path}: {MANIFEST} was edited after prepare-data wrote it (its fields no longer "
                        f"match its manifest_sha256); {again}")
    missing = [key for key in MANIFEST_FIELDS if key not in m]
    if missing:
        raise DataError(f"data.path {path}: {MANIFEST} lacks {', '.join(missing)}; {again}")
    return m


class PreparedCorpus:
    """A folder written by `pangu-moe prepare-data`.

    Args: path: the folder; verify: check every shard's sha256 against the manifest now (`verify`).
    Raises DataError with one line: no manifest (an interrupted preparation), another format, a missing or
    altered shard.
    """

    def __init__(self, path, verify=True):
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            shards = os.path.isdir(path) and any(name.endswith(".mindrecord") for name in os.listdir(path))
            raise DataError(f"data.path {path}: no {MANIFEST}" + (
                f": an interrupted preparation (shard files, no {MANIFEST}); delete the folder and run "
                f"prepare-data again" if shards else " (not a prepare-data folder)"))
        self.manifest = m = _read_manifest(path, manifest_path)
        self.path, self.seq_len, self.domains = path, m["seq_len"], m["domains"]
        tok = m["tokenizer"]
        try:
            self.tokenizer = ByteTokenizer() if tok["kind"] == BYTES else BpeTokenizer.load(
                os.path.join(path, TOKENIZER_FILE))
        except Exception as e:  # the tokenizers library's own errors, or ours for a tokenizer that is not byte-level
            raise DataError(f"data.path {path}: {TOKENIZER_FILE}: {one_line(e)}") from None
        if self.tokenizer.identity != tok["identity"]:
            raise DataError(f"data.path {path}: {TOKENIZER_FILE} is not the tokenizer the shards were written with "
                            f"(identity differs from the manifest's)")
        self.per_record = m["windows_per_record"]
        self.files, self.file_windows, self.windows = {}, {}, {}  # per (domain, split): files, windows of each
        for shard in m["shards"]:
            key = (shard["domain"], shard["split"])
            self.files.setdefault(key, []).append(os.path.join(path, shard["file"]))
            self.file_windows.setdefault(key, []).append(shard["windows"])
            self.windows[key] = self.windows.get(key, 0) + shard["windows"]
            for file in (self.files[key][-1], self.files[key][-1] + ".db"):
                if not os.path.isfile(file):
                    raise DataError(f"data.path {path}: shard {os.path.basename(file)} is missing")
        if verify:
            self.verify()

    def verify(self, ranks=None, world=1):
        """Raise DataError if a shard file's sha256 differs from the manifest's, reading each checked file once:
        every validation shard, and the training shards holding the shares of `ranks` of `world` (`RankStream`;
        None: every shard)."""
        first = {}  # (domain, split) -> the first window of the next shard of it, in manifest order
        for shard in self.manifest["shards"]:
            key = (shard["domain"], shard["split"])
            start = first.get(key, 0)
            first[key] = start + shard["windows"]
            if ranks is not None and shard["split"] == "train":
                share = self.windows[key] // world
                if not any(start < (r + 1) * share and r * share < start + shard["windows"] for r in ranks):
                    continue
            file = os.path.join(self.path, shard["file"])
            for name, digest in zip((file, file + ".db"), shard["sha256"]):
                if sha256_file(name) != digest:
                    raise DataError(f"data.path {self.path}: shard {os.path.basename(name)} does not match its "
                                    f"sha256 in {MANIFEST} (damaged or truncated since prepare-data wrote it); copy "
                                    f"the corpus folder again, or prepare it again")

    def check(self, model_cfg, data_cfg):
        """Raise DataError if a run's config cannot train on this corpus (seq_len, domains, vocabulary)."""
        if model_cfg.seq_len != self.seq_len:
            raise DataError(f"model.seq_len = {model_cfg.seq_len}: must be {self.seq_len}, the window length "
                            f"{self.path} was prepared with")
        if list(data_cfg.domains) != self.domains:
            raise DataError(f"data.domains = {list(data_cfg.domains)}: must be {self.domains}, the domains of "
                            f"{self.path}")
        if model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"model.vocab_size = {model_cfg.vocab_size}: must be at least {self.tokenizer.vocab_size}, "
                            f"the vocabulary of {self.path}'s tokenizer")

    def train_bytes(self):
        """UTF-8 bytes of each domain's training documents (the `bytes` mixture's weights)."""
        return [self.manifest["counts"][d]["train"]["bytes"] for d in self.domains]

    def _record_of(self, key, window):
        """(index over all files' records, index of its first window) of the record holding `window`."""
        per_file = np.asarray(self.file_windows[key])
        file = int(np.searchsorted(np.cumsum(per_file), window, side="right"))
        first_window = int(per_file[:file].sum())
        records_before = int((-(-per_file[:file] // self.per_record)).sum())  # every file's last record may be short
        local = (window - first_window) // self.per_record
        return records_before + local, first_window + local * self.per_record

    def read(self, domain, split, start, count):
        """Windows [start, start + count) of (domain name, split) in shard order: int32 [count, S + 1]. Only the
        files holding them are opened, so a read costs the same however many files the split has."""
        import mindspore.dataset as ds
        key = (domain, split)
        first, base = self._record_of(key, start)
        last, _ = self._record_of(key, start + count - 1)
        ends = np.cumsum(self.file_windows[key])
        first_file = int(np.searchsorted(ends, start, side="right"))
        last_file = int(np.searchsorted(ends, start + count - 1, side="right"))
        skipped = self._record_of(key, int(ends[first_file - 1]))[0] if first_file else 0  # records of earlier files
        dataset = ds.MindDataset(self.files[key][first_file:last_file + 1], columns_list=["input_ids"],
                                 sampler=ds.SequentialSampler(start_index=first - skipped,
                                                              num_samples=last - first + 1))
        records = [row[0] for row in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)]
        windows = np.concatenate(records).reshape(-1, self.seq_len + 1)  # (windows of the records, S+1)
        return windows[start - base:start - base + count].astype(np.int32)


class RankStream:
    """Rank `rank`'s training windows of one domain, endlessly, in the order of the module doc.

    Args: corpus: PreparedCorpus; domain: index into corpus.domains; rank, world: r and W; seed: run seed;
        consumed: windows already read (the stream's position).
    """

    def __init__(self, corpus, domain, rank, world, seed, consumed=0):
        self.corpus, self.name = corpus, corpus.domains[domain]
        self.share = corpus.windows[self.name, "train"] // world
        if self.share == 0:
            raise DataError(f"data.path {corpus.path}: domain {self.name!r} has {corpus.windows[self.name, 'train']} "
                            f"training windows, fewer than the {world} ranks")
        self.first = rank * self.share
        self.key = (seed, domain, rank)
        self.sizes = np.full(-(-self.share // BLOCK), BLOCK)
        self.sizes[-1] = self.share - BLOCK * (len(self.sizes) - 1)
        self.position = consumed
        self.cached = None  # (epoch, block, its windows in their order)
        self.epoch_order = None  # (epoch, block order, cumulative window counts in that order)

    def _locate(self, position):
        """(epoch, block, offset in the block's order) of the stream's `position`-th window."""
        epoch, p = divmod(position, self.share)
        if self.epoch_order is None or self.epoch_order[0] != epoch:
            order = np.random.default_rng((*self.key, epoch)).permutation(len(self.sizes))
            self.epoch_order = (epoch, order, np.cumsum(self.sizes[order]))
        _, order, ends = self.epoch_order
        slot = int(np.searchsorted(ends, p, side="right"))
        return epoch, int(order[slot]), p - int(ends[slot] - self.sizes[order[slot]])

    def next(self):
        """The next window: int32 [S + 1]."""
        epoch, block, offset = self._locate(self.position)
        if self.cached is None or self.cached[:2] != (epoch, block):
            windows = self.corpus.read(self.name, "train", self.first + block * BLOCK, int(self.sizes[block]))
            order = np.random.default_rng((*self.key, epoch, block)).permutation(len(windows))
            self.cached = (epoch, block, windows[order])
        self.position += 1
        return self.cached[2][offset]


def stream_positions(start_step, rows, batch_size, world, num_domains, mixture, domains_of, chunk=1 << 20):
    """int64 [W, D]: the windows each (rank, domain) stream gave to rows `rows` of the global batches of steps
    0..start_step-1, i.e. where a resumed run's streams stand. Row j of step s is sample s·B + j, and
    `domains_of` maps int64 [n] sample indices to their domains (`pipeline.sample_domains`). With `by_node` a
    row's domain depends on j only and with `uniform` it is (s·B + j) mod D, so both are counted in closed form;
    `bytes` draws are counted `chunk` samples at a time in numpy (100,000 steps of 512 rows: `bench data`
    prints the seconds as `resume_seconds`)."""
    consumed = np.zeros((world, num_domains), np.int64)
    per_rank = batch_size // world
    rows = np.asarray(rows, np.int64)
    if mixture == "bytes":
        steps_a_chunk = max(1, chunk // max(1, len(rows)))
        for first in range(0, start_step, steps_a_chunk):
            steps = np.arange(first, min(start_step, first + steps_a_chunk), dtype=np.int64)
            indices = (steps[:, None] * batch_size + rows[None, :]).ravel()  # (steps * rows,), step-major
            pairs = np.tile(rows // per_rank, len(steps)) * num_domains + domains_of(indices)  # rank * D + domain
            consumed += np.bincount(pairs, minlength=world * num_domains).reshape(world, num_domains)
        return consumed
    for j in rows:
        if mixture == "by_node":
            consumed[j // per_rank, domains_of(np.array([j]))[0]] += start_step
        else:  # uniform: (j + s·B) mod D over s < start_step
            consumed[j // per_rank] += np.bincount((j + batch_size * np.arange(start_step, dtype=np.int64))
                                                   % num_domains, minlength=num_domains)
    return consumed


def train_batches(corpus, batch_size, seed, start_step, steps, mixture, world=1, devices_per_node=1, rows=None):
    """Iterator of numpy batches (input_ids, labels, domain_ids) int32 [b, S] for steps start_step..steps-1: the
    rows `rows` (a slice of the global batch's B rows, default all) of each global batch, read from the streams
    of the ranks holding them only."""
    num_domains, per_rank = len(corpus.domains), batch_size // world
    rows = np.arange(batch_size)[rows or slice(None)]
    weights = np.asarray(corpus.train_bytes(), np.float64)
    weights = weights / weights.sum()
    layout = (batch_size, world, devices_per_node)

    def domains_of(indices):
        return sample_domains(indices, mixture, seed, num_domains, weights, layout)

    consumed = stream_positions(start_step, rows, batch_size, world, num_domains, mixture, domains_of)
    streams = {}
    for step in range(start_step, steps):
        domains = domains_of(step * batch_size + rows)
        windows = []
        for j, domain in zip(rows.tolist(), domains.tolist()):
            rank = j // per_rank
            if (rank, domain) not in streams:
                streams[rank, domain] = RankStream(corpus, domain, rank, world, seed, int(consumed[rank, domain]))
            windows.append(streams[rank, domain].next())
        windows = np.stack(windows)  # (b, S+1)
        domain_ids = np.repeat(domains.astype(np.int32)[:, None], windows.shape[1] - 1, 1)  # (b, S)
        yield windows[:, :-1], windows[:, 1:], domain_ids


def val_windows(corpus, max_per_domain):
    """The first n validation windows of every domain, n = min(fewest of any domain, max_per_domain),
    interleaved domain by domain (as `pipeline.val_windows`).

    Returns: (input_ids [N, S], labels [N, S], domain_ids [N, S]) int32, N = n * D.
    """
    n = min(min(corpus.windows[d, "val"] for d in corpus.domains), max_per_domain)
    return interleave([corpus.read(d, "val", 0, n) for d in corpus.domains])
