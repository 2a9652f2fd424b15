"""Byte-level tokenizer: token id = UTF-8 byte value, so vocabulary 256 and bits per token = bits per byte."""
import numpy as np


def encode(text):
    """str -> uint8 array [n] of UTF-8 bytes."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(ids):
    """Iterable of ids in [0, 256) -> str (invalid UTF-8 sequences replaced)."""
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")
