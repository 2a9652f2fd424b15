"""Corpora: documents with domain labels, read from JSONL, per-domain folders or the built-in demo.

A corpus is split deterministically into train and validation text per domain, at document
granularity (every k-th document, k = round(1 / val_fraction)); a domain with too few documents
gives the tail of its text instead. All problems with user data raise `DataError` with one line.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from pangu_moe.data import demo_corpus, tokenizer


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) and what is wrong."""


@dataclass
class DomainText:
    """One domain's text as byte ids: train [n_train] uint8, val [n_val] uint8."""
    name: str
    train: np.ndarray
    val: np.ndarray


BAD_UTF8 = ("error", "replace")  # what a reader does with bytes that are not UTF-8


@dataclass
class ReadCounts:
    """Documents a reader skipped or altered: empty ones (skipped) and ones with bytes that were not UTF-8
    (decoded with U+FFFD in their place, with `bad_utf8="replace"`)."""
    empty_documents: int = 0
    replaced_utf8_documents: int = 0


def _decode(raw, where, bad_utf8, counts):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad_utf8 == "error":
            raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None
        counts.replaced_utf8_documents += 1
        return raw.decode("utf-8", errors="replace")


def iter_jsonl(path, domains, text_field="text", domain_field="domain", bad_utf8="error", counts=None):
    """Stream the documents of a JSONL file of {text_field: str, domain_field: str} lines, in file order.

    Blank lines and empty texts are skipped (empty texts counted in `counts`, a `ReadCounts`).
    Yields: (domain, text, "path:line").
    """
    if not os.path.isfile(path):
        raise DataError(f"data.path {path}: no such file")
    counts = counts if counts is not None else ReadCounts()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, bad_utf8, counts)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str) \
                    or not isinstance(record.get(domain_field), str):
                raise DataError(f"{where}: must be an object with string fields \"{text_field}\" and "
                                f"\"{domain_field}\"")
            if record[domain_field] not in domains:
                raise DataError(f"{where}: unknown domain {record[domain_field]!r}; data.domains allows "
                                f"{', '.join(domains)}")
            if not record[text_field]:
                counts.empty_documents += 1
                continue
            yield record[domain_field], record[text_field], where


def iter_folders(path, domains, bad_utf8="error", counts=None):
    """Stream the documents `path/<domain>/**/*.txt` (one document a file), domains and files sorted by path.

    Empty files are skipped and counted in `counts` (a `ReadCounts`). Yields: (domain, text, file path).
    """
    if not os.path.isdir(path):
        raise DataError(f"data.path {path}: no such folder")
    counts = counts if counts is not None else ReadCounts()
    found = sorted(e.name for e in os.scandir(path) if e.is_dir())
    unknown = [f for f in found if f not in domains]
    if unknown:
        raise DataError(f"data.path {path}: sub-folder {unknown[0]!r} is an unknown domain; data.domains "
                        f"allows {', '.join(domains)}")
    for domain in found:
        for file in folder_files(os.path.join(path, domain)):
            with open(file, "rb") as fh:
                text = _decode(fh.read(), file, bad_utf8, counts)
            if not text:
                counts.empty_documents += 1
                continue
            yield domain, text, file


def folder_files(root):
    """The .txt files under `root`, sorted by path."""
    return sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".txt"))


def read_jsonl(path, domains):
    """Documents from a JSONL file of {"text": str, "domain": str} lines (blank lines and empty texts skipped).

    Returns: {domain: [text, ...]} in file order.
    """
    return _collect(iter_jsonl(path, domains), domains)


def read_folders(path, domains):
    """Documents from `path/<domain>/**/*.txt`, sorted by relative path.

    Returns: {domain: [text, ...]}.
    """
    return _collect(iter_folders(path, domains), domains)


def _collect(documents, domains):
    docs = {d: [] for d in domains}
    for domain, text, _ in documents:
        docs[domain].append(text)
    return docs


def split_domains(docs, val_fraction, max_bytes, min_bytes, source):
    """Train/val split per domain.

    Args:
        docs: {domain: [text, ...]} in a deterministic order.
        val_fraction: share of documents (or of bytes, for few documents) held out.
        max_bytes: cap on the bytes taken per domain (documents in order until the cap).
        min_bytes: each split needs at least this many bytes (seq_len + 1).
        source: name used in error messages.
    Returns:
        [DomainText] in the order of `docs`.
    """
    every = max(2, round(1 / val_fraction))
    out = []
    for name, texts in docs.items():
        texts = [t for t in texts if t]
        if not texts:
            raise DataError(f"{source}: domain {name!r} has no text; every domain in data.domains needs some")
        encoded, total = [], 0
        for t in texts:
            if total >= max_bytes:
                break
            ids = tokenizer.encode(t)[:max_bytes - total]
            encoded.append(ids)
            total += len(ids)
        if len(encoded) >= every:
            val_docs = [ids for i, ids in enumerate(encoded) if i % every == every // 2]
            train_docs = [ids for i, ids in enumerate(encoded) if i % every != every // 2]
            train, val = _join(train_docs), _join(val_docs)
        else:
            allbytes = _join(encoded)
            cut = len(allbytes) - max(1, int(len(allbytes) * val_fraction))
            train, val = allbytes[:cut], allbytes[cut:]
        for split, ids in (("training", train), ("validation", val)):
            if len(ids) < min_bytes:
                raise DataError(f"{source}: domain {name!r} has {len(ids)} bytes of {split} text; need at least "
                                f"{min_bytes} (model.seq_len + 1)")
        out.append(DomainText(name, train, val))
    return out


def _join(arrays):
    sep = tokenizer.encode("\n\n")
    parts = []
    for a in arrays:
        parts += [a, sep]
    return np.concatenate(parts[:-1]) if parts else np.zeros(0, np.uint8)


def load_corpus(data_cfg, seq_len):
    """The corpus named by a `DataConfig`: [DomainText] in `data_cfg.domains` order."""
    if data_cfg.source == "demo":
        docs, source = demo_corpus.documents(data_cfg.max_bytes_per_domain), "demo corpus"
    elif data_cfg.source == "jsonl":
        docs, source = read_jsonl(data_cfg.path, data_cfg.domains), data_cfg.path
    else:
        docs, source = read_folders(data_cfg.path, data_cfg.domains), data_cfg.path
    return split_domains(docs, data_cfg.val_fraction, data_cfg.max_bytes_per_domain, seq_len + 1, source)
