"""`pangu-moe prepare-data`: a corpus into MindRecord shards of training windows, streamed.

Output folder:
- `<domain>-<split>-<nnnnn>.mindrecord` (+ its `.db` index), split `train` or `val`: records
  {"input_ids": int32 [w * (S + 1)]}, w = `WINDOWS_PER_RECORD` consecutive training windows (fewer in a
  file's last record). A domain's documents are tokenized in input order, joined by the tokens of "\\n\\n"
  and cut into windows of S + 1 tokens overlapping by one (window k covers tokens kS .. kS + S), so the
  labels of consecutive windows continue each other; the last partial window is dropped (counted).
  Several windows a record because MindRecord checks every record in Python: one window a record wrote
  5x slower (measured with MindSpore 2.10).
- `tokenizer.json` for a BPE tokenizer.
- `manifest.json`, written last and atomically: the format, seq_len, domains, the tokenizer (kind,
  identity, vocab size), per domain and split the documents, tokens, UTF-8 bytes and windows, the
  skipped documents, and every shard with its record count, size and sha256. A folder without it is
  an interrupted preparation, which training refuses.

Document d of a domain (counting from 0, in input order) is held out for validation when
d mod k = k // 2, k = max(2, round(1 / val_fraction)): the rule `data.corpus.split_domains` uses.

Memory is bounded whatever the corpus size: the largest document, a write buffer of `WRITE_BATCH` records
per (domain, split), and a BPE tokenizer's training tables, which follow its sample of the input
(`bpe_sample`, streamed to `tokenizers` in a first pass), not the corpus.
"""
import hashlib
import json
import os
import time

import numpy as np

from pangu_moe.config import one_line
from pangu_moe.data.corpus import DataError, ReadCounts, folder_files, iter_folders, iter_jsonl
from pangu_moe.data.encode_workers import encoded
from pangu_moe.data.tokenizer import BYTES, BpeTokenizer, ByteTokenizer

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = 2  # format 1 held one window a record
INPUT_FORMATS = ("jsonl", "folders")
SPLITS = ("train", "val")
SEPARATOR = "\n\n"
WINDOWS_PER_RECORD = 64
WRITE_BATCH = 4  # records per FileWriter.write_raw_data call
# Input a bpe:V tokenizer trains on, by default. Merges come from the most frequent pairs, which a sample of this size
# already ranks; the trainer's memory follows the distinct words of the sample (bench data: ~700 MB peak for a 64 MB
# Zipf-vocabulary sample at V = 8192, 732-770 MB at 100 MB).
BPE_SAMPLE_MB = 100


def _power_of_two(need, low, high):
    return min(max(1 << (need - 1).bit_length(), low), high)


def page_bytes(seq_len):
    """MindRecord page size for windows of `seq_len` + 1 int32 tokens: the power of two holding one write batch
    of records, within MindRecord's bounds [32 KB, 256 MB].

    MindRecord's defaults (a 16 MB header, 32 MB pages) left every shard file a sparse 48 MB or more by `ls -l`
    however little it held, and copies and object stores expand sparse files."""
    return _power_of_two(WRITE_BATCH * WINDOWS_PER_RECORD * (seq_len + 1) * 4, 1 << 15, 1 << 28)


def header_bytes(max_windows):
    """MindRecord header size for a shard of at most `max_windows` windows: its JSON page table takes about
    10 bytes a record and 150 a page (measured: 8.4 KB for 1,024 records in 44 pages); 256 a record is the
    margin. Within MindRecord's bounds [16 KB, 128 MB]."""
    return _power_of_two(256 * -(-max_windows // WINDOWS_PER_RECORD), 1 << 16, 1 << 27)


def manifest_digest(manifest):
    """sha256 of a manifest's fields other than "manifest_sha256" itself (sorted-key JSON): an edited window count
    or shard entry no longer matches, and the reader refuses the corpus before training starts."""
    fields = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def fsync_path(path):
    """Flush a file's or a folder's (its entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Windows of one (domain, split) into MindRecord files of at most `max_windows` windows each, packed
    `WINDOWS_PER_RECORD` to a record.

    Returns on `close` the manifest entries of the files written.
    """

    def __init__(self, out, domain, split, seq_len, max_windows):
        self.out, self.prefix, self.seq_len, self.max_windows = out, f"{domain}-{split}", seq_len, max_windows
        self.domain, self.split = domain, split
        self.writer, self.name, self.entries = None, None, []
        self.windows, self.records = [], []  # not yet in a record; records not yet written
        self.in_file, self.records_in_file = 0, 0  # windows and records of the open file, written or pending

    def write(self, window):
        """window: int32 [S + 1]."""
        self.windows.append(window)
        if len(self.windows) == WINDOWS_PER_RECORD or self.in_file + len(self.windows) == self.max_windows:
            self._pack()

    def _pack(self):
        if not self.windows:
            return
        self.records.append({"input_ids": np.concatenate(self.windows)})  # (w*(S+1),)
        self.in_file += len(self.windows)
        self.records_in_file += 1
        self.windows = []
        if len(self.records) == WRITE_BATCH or self.in_file == self.max_windows:
            self._flush()

    def _flush(self):
        if not self.records:
            return
        if self.writer is None:
            from mindspore.mindrecord import FileWriter
            name = os.path.join(self.out, f"{self.prefix}-{len(self.entries):05d}.mindrecord")
            self.writer = FileWriter(name, shard_num=1, overwrite=False)
            self.writer.set_header_size(header_bytes(self.max_windows))
            self.writer.set_page_size(page_bytes(self.seq_len))
            self.writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "windows")
            self.name = name
        self.writer.write_raw_data(self.records)
        self.records = []
        if self.in_file == self.max_windows:
            self._commit()

    def _commit(self):
        self.writer.commit()
        files = [self.name, self.name + ".db"]
        for name in files:  # on disk before the manifest that lists them
            fsync_path(name)
        self.entries.append({"file": os.path.basename(self.name), "domain": self.domain, "split": self.split,
                             "windows": self.in_file, "records": self.records_in_file,
                             "bytes": sum(os.path.getsize(f) for f in files),
                             "sha256": [sha256_file(f) for f in files]})
        self.writer, self.in_file, self.records_in_file = None, 0, 0

    def close(self):
        self._pack()
        self._flush()
        if self.writer is not None:
            self._commit()
        return self.entries


class WindowPacker:
    """Joins a domain's documents into one token stream and cuts windows of S + 1 tokens overlapping by one."""

    def __init__(self, seq_len, separator, writer):
        self.seq_len, self.separator, self.writer = seq_len, separator, writer
        self.buffer = np.zeros(0, np.int32)
        self.counts = {"documents": 0, "tokens": 0, "bytes": 0, "windows": 0}

    def add(self, ids, num_bytes):
        """One document's token ids [n] int32 and its UTF-8 byte count."""
        if self.counts["documents"]:
            ids = np.concatenate((self.separator, ids))
        self.counts["documents"] += 1
        self.counts["tokens"] += len(ids)
        self.counts["bytes"] += num_bytes
        self.buffer = np.concatenate((self.buffer, ids))
        step = self.seq_len
        n = (len(self.buffer) - 1) // step  # whole windows available
        for k in range(n):
            self.writer.write(self.buffer[k * step:k * step + step + 1])
        self.counts["windows"] += n
        self.buffer = self.buffer[n * step:]  # the last token of the last window starts the next one

    def close(self):
        """Returns (counts, shard entries); the tokens left over (fewer than S + 1) are dropped."""
        self.counts["tail_tokens_dropped"] = max(0, len(self.buffer) - 1)
        return self.counts, self.writer.close()


def _documents(input_path, input_format, domains, text_field, domain_field, bad_utf8, counts):
    if input_format == "jsonl":
        return iter_jsonl(input_path, domains, text_field, domain_field, bad_utf8, counts)
    return iter_folders(input_path, domains, bad_utf8, counts)


def _input_bytes(input_path, input_format):
    if input_format == "jsonl":
        return os.path.getsize(input_path) if os.path.isfile(input_path) else 0
    return sum(os.path.getsize(f) for f in folder_files(input_path)) if os.path.isdir(input_path) else 0


def bpe_sample(texts, share, seed):
    """The texts a BPE trains on: each document kept with probability `share` (one uniform draw a document, in
    order, from a generator seeded by `seed`), so the trainer's tables grow with the sample, not the corpus:
    HF's BpeTrainer keeps a count per distinct pre-tokenised word, and their number keeps growing with the text
    (Heaps' law)."""
    if share >= 1.0:
        yield from texts
        return
    rng = np.random.default_rng(seed)
    for text in texts:
        if rng.random() < share:
            yield text


def make_tokenizer(spec, documents, log):
    """`--tokenizer`: "bytes", "bpe:<vocab size>" (trained on `documents()`, a fresh stream of texts) or the path
    of a tokenizer.json."""
    if spec == BYTES:
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < 257:
            raise DataError(f"--tokenizer {spec}: the BPE vocabulary must be an integer above 256 (e.g. bpe:8192)")
        log(f"prepare-data: training a byte-level BPE tokenizer of {size} ids on the corpus (first pass)")
        return BpeTokenizer.train(documents(), int(size))
    if not os.path.isfile(spec):
        raise DataError(f"--tokenizer {spec}: must be bytes, bpe:<vocab size> or an existing tokenizer.json")
    try:
        return BpeTokenizer.load(spec)
    except Exception as e:  # the library's own error types
        raise DataError(f"--tokenizer {spec}: cannot be used ({one_line(e)})") from None


def prepare(input_path, out, domains, seq_len, input_format="jsonl", tokenizer="bytes", text_field="text",
            domain_field="domain", val_fraction=0.05, bad_utf8="error", shard_records=65536, log=print,
            bpe_sample_mb=BPE_SAMPLE_MB, seed=0, workers=1):
    """Write the prepared corpus (module doc) of `input_path` into the new folder `out`.

    Args: domains: names (a domain's id is its position); seq_len: S; input_format: jsonl or folders;
        tokenizer: see `make_tokenizer`; bad_utf8: error or replace; shard_records: windows per shard file;
        bpe_sample_mb: MB of input a `bpe:V` tokenizer trains on (`bpe_sample`; the whole corpus when smaller);
        seed: of that sample; workers: processes that tokenize (`encode_workers`; the output is the same).
    Returns: the manifest dict. Raises DataError with one line.
    """
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MANIFEST)) and any(
                name.endswith((".mindrecord", ".mindrecord.db", MANIFEST + ".tmp")) for name in os.listdir(out)):
            raise DataError(f"--out {out}: holds an interrupted preparation (shard files, no {MANIFEST}); delete the "
                            f"folder and run prepare-data again")
        raise DataError(f"--out {out}: exists and is not empty; prepare-data writes a new folder")
    if input_format not in INPUT_FORMATS:
        raise DataError(f"--format {input_format}: must be one of {', '.join(INPUT_FORMATS)}")
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"--val-fraction {val_fraction}: must be in (0, 0.5]")
    if not bpe_sample_mb > 0:
        raise DataError(f"--bpe-sample-mb {bpe_sample_mb}: must be > 0")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")
    counts = ReadCounts()

    def documents():
        return _documents(input_path, input_format, domains, text_field, domain_field, bad_utf8, counts)

    total_bytes = _input_bytes(input_path, input_format)
    share = min(1.0, bpe_sample_mb * 1e6 / total_bytes) if total_bytes else 1.0
    tok = make_tokenizer(tokenizer, lambda: bpe_sample((text for _, text, _ in documents()), share, seed), log)
    os.makedirs(out, exist_ok=True)
    if tok.kind != BYTES:
        tok.save(os.path.join(out, TOKENIZER_FILE))
    counts.empty_documents = counts.replaced_utf8_documents = 0  # a BPE pass counted them once already
    separator = tok.encode(SEPARATOR)
    packers = {(d, s): WindowPacker(seq_len, separator, ShardWriter(out, d, s, seq_len, shard_records))
               for d in domains for s in SPLITS}
    every = max(2, round(1 / val_fraction))
    seen = dict.fromkeys(domains, 0)
    read_bytes, tokens = 0, 0
    began = last = time.monotonic()
    for (domain, text, _), ids in encoded(documents(), tok, workers, os.path.join(out, TOKENIZER_FILE)):
        split = "val" if seen[domain] % every == every // 2 else "train"
        seen[domain] += 1
        num_bytes = len(text.encode("utf-8"))
        packers[domain, split].add(ids, num_bytes)
        read_bytes, tokens = read_bytes + num_bytes, tokens + len(ids)
        now = time.monotonic()
        if now - last >= 2.0:
            rate = tokens / (now - began)
            eta = (now - began) / read_bytes * max(0, total_bytes - read_bytes) if read_bytes else 0.0
            log(f"prepare-data: {sum(seen.values()):,} documents, {read_bytes / 1e6:,.1f} MB, {rate:,.0f} tokens/s, "
                f"eta {eta:.0f}s")
            last = now
    shards, per_domain = [], {d: {} for d in domains}
    for (domain, split), packer in packers.items():
        per_domain[domain][split], entries = packer.close()
        shards += entries
    for domain in domains:
        for split in SPLITS:
            if per_domain[domain][split]["windows"] == 0:
                raise DataError(f"{input_path}: domain {domain!r} gives no {split} window of {seq_len + 1} tokens "
                                f"({per_domain[domain][split]['documents']} documents); add text or lower --seq-len")
    manifest = {"format": FORMAT, "seq_len": seq_len, "domains": list(domains),
                "windows_per_record": WINDOWS_PER_RECORD,
                "tokenizer": {"kind": tok.kind, "identity": tok.identity, "vocab_size": tok.vocab_size,
                              "file": TOKENIZER_FILE if tok.kind != BYTES else None},
                "val_every": every, "counts": per_domain,
                "bpe_sample": {"share": share, "seed": seed} if tokenizer.startswith("bpe:") else None,
                "skipped": {"empty_documents": counts.empty_documents,
                            "replaced_utf8_documents": counts.replaced_utf8_documents},
                "shards": shards}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(out, MANIFEST))
    fsync_path(out)  # the rename itself
    log(f"prepare-data: {sum(seen.values()):,} documents, {tokens:,} tokens in {len(shards)} shards -> {out}")
    return manifest
