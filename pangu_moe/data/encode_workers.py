"""prepare-data's tokenization on several processes, in input order, so the output does not depend on the number
of workers (`prepare-data --workers N`; tested byte for byte against one worker).

The main process reads the documents, and packs and writes the windows; the workers only encode. At most
`IN_FLIGHT_PER_WORKER` chunks of `CHUNK_DOCUMENTS` documents per worker are queued, so memory stays bounded
whatever the corpus size.
"""
import multiprocessing
import os
from collections import deque

from pangu_moe.data.tokenizer import BYTES, BpeTokenizer, ByteTokenizer

CHUNK_DOCUMENTS = 64
IN_FLIGHT_PER_WORKER = 2
_TOKENIZER = None  # a worker process's tokenizer (`_start`)


def available_cores():
    """The cores this process may use (its CPU affinity; the affinity call exists on Linux only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start(kind, path):
    global _TOKENIZER
    _TOKENIZER = ByteTokenizer() if kind == BYTES else BpeTokenizer.load(path)


def _encode(texts):
    return [_TOKENIZER.encode(text) for text in texts]


def _chunks(items, size):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encoded(documents, tokenizer, workers, tokenizer_path=None):
    """(document, token ids int32 [n]) for each document of `documents` ((domain, text, ...) tuples), in their
    order. `workers` = 1 encodes here; more start that many spawned processes, each loading the tokenizer
    (`tokenizer_path`: the saved tokenizer.json of a BPE)."""
    if workers == 1:
        for document in documents:
            yield document, tokenizer.encode(document[1])
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's state
    with context.Pool(workers, _start, (tokenizer.kind, tokenizer_path)) as pool:
        pending = deque()
        for chunk in _chunks(documents, CHUNK_DOCUMENTS):
            pending.append((chunk, pool.apply_async(_encode, ([document[1] for document in chunk],))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                chunk, result = pending.popleft()
                yield from zip(chunk, result.get())
        while pending:
            chunk, result = pending.popleft()
            yield from zip(chunk, result.get())
