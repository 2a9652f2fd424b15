"""Tokenizers: bytes (token id = UTF-8 byte value, 256 ids) and byte-level BPE.

BPE is HF `tokenizers` (pinned in pyproject.toml): a Rust library that trains from a stream of texts in bounded
memory and whose byte-level BPE maps any text to tokens and back exactly (CJK, accents, emoji), because
every token is a sequence of bytes. Each token's byte length is therefore fixed (`token_bytes`), which
is what bits per byte need.

A tokenizer's `identity` (a sha256) names it in a prepared corpus's manifest and in runs trained on it.
"""
import functools
import hashlib
import json

import numpy as np

BYTES = "bytes"


def encode(text):
    """str -> uint8 array [n] of UTF-8 bytes (the byte tokenizer)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(ids):
    """Iterable of ids in [0, 256) -> str (invalid UTF-8 sequences replaced; the byte tokenizer)."""
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class ByteTokenizer:
    """Token id = UTF-8 byte value: 256 ids, one byte each."""

    kind = BYTES
    vocab_size = 256
    identity = hashlib.sha256(b"pangu_moe byte tokenizer").hexdigest()

    def encode(self, text):
        """str -> int32 array [n]."""
        return encode(text).astype(np.int32)

    def decode(self, ids):
        """ids -> str."""
        return decode(ids)

    def token_bytes(self):
        """int64 [V]: the UTF-8 bytes each token stands for."""
        return np.ones(self.vocab_size, np.int64)

    def piece(self, token):
        """The bytes token id `token` stands for."""
        return bytes([int(token)])


class BpeTokenizer:
    """Byte-level BPE (HF `tokenizers`), trained with `train` or read with `load`.

    Only byte-level tokenizers without added tokens are accepted (`load` raises ValueError otherwise): for
    them every token is a fixed byte sequence, which `token_bytes` and an exact round trip rely on.
    `identity` is the sha256 of the tokenizer's canonical JSON (`Tokenizer.to_str()`).
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        spec = json.loads(tokenizer.to_str())
        kinds = {part: (spec.get(part) or {}).get("type") for part in ("pre_tokenizer", "decoder")}
        if kinds != {"pre_tokenizer": "ByteLevel", "decoder": "ByteLevel"} or spec.get("added_tokens"):
            raise ValueError(f"not a byte-level BPE without added tokens (pre-tokenizer {kinds['pre_tokenizer']}, "
                             f"decoder {kinds['decoder']}, {len(spec.get('added_tokens') or [])} added tokens)")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.identity = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def train(cls, texts, vocab_size):
        """Train on an iterable of str (read once, streamed) to `vocab_size` ids (>= 256: the 256 bytes first)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path):
        """A tokenizer saved by `save` (HF tokenizer.json)."""
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path):
        self.tokenizer.save(str(path))

    def encode(self, text):
        """str -> int32 array [n]."""
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids):
        """ids -> str (a cut inside a character decodes to U+FFFD)."""
        return self.tokenizer.decode([int(i) for i in ids])

    def token_bytes(self):
        """int64 [V]: the UTF-8 bytes each token stands for (byte-level BPE writes one character per byte)."""
        return np.array([len(self.tokenizer.id_to_token(i)) for i in range(self.vocab_size)], np.int64)

    def piece(self, token):
        """The bytes token id `token` stands for (possibly part of a character): its byte-level characters
        mapped back through `byte_level_alphabet`."""
        inverse = _byte_of_char()
        return bytes(inverse[c] for c in self.tokenizer.id_to_token(int(token)))


def byte_level_alphabet():
    """[256] str: the character byte-level BPE writes for each byte value (GPT-2's table, which HF `tokenizers`'
    ByteLevel uses): printable Latin-1 bytes stand for themselves, the others for U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@functools.lru_cache(maxsize=1)
def _byte_of_char():
    return {c: b for b, c in enumerate(byte_level_alphabet())}
