"""The data path's speed and memory: `prepare-data` and the prepared reader on synthetic corpora of two sizes.

Each corpus (JSONL, two domains, documents of 200-4000 bytes drawn from a fixed word list with accented,
CJK and emoji words among ASCII ones) is prepared with the byte tokenizer and then read for `read_steps`
batches of the demo's shape (B = 16, S = 256) in a fresh subprocess, whose peak RSS (`peak_rss_mb`) is the
memory figure: the corpus grows 8x between the two sizes, the memory should not. `read_over_train` compares
the reader's tokens/s with the tokens/s of the demo's compiled training step, timed in this process.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the", "of", "expert", "router", "capacity", "token", "layer", "node", "def", "return", "x", "=", "(", ")",
         "café", "naïve", "Zürich", "日本語", "数据", "🙂", "🚀", "señor", "über", "λ", "→")
SIZES_MB = (64, 512)
BATCH, SEQ_LEN = 16, 256


def synthetic_jsonl(path, megabytes, seed=0):
    """Write a JSONL corpus of about `megabytes` MB of text (domains prose and code alternate); returns its bytes."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    written, i = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < megabytes * 1e6:
            text = " ".join(words[rng.integers(0, len(words), int(rng.integers(40, 800)))])
            line = json.dumps({"text": text, "domain": ("prose", "code")[i % 2]}, ensure_ascii=False) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return written


def worker(source, out, read_steps):
    """In a fresh process: prepare `source` into `out`, read `read_steps` batches; print one JSON line."""
    from pangu_moe.data.prepare import prepare
    from pangu_moe.data.prepared import PreparedCorpus, train_batches
    began = time.perf_counter()
    prepare(source, out, ["prose", "code"], SEQ_LEN, log=lambda line: None)
    prepare_s = time.perf_counter() - began
    corpus = PreparedCorpus(out, verify=False)
    began = time.perf_counter()
    for _ in train_batches(corpus, BATCH, 1, 0, read_steps, "uniform"):
        pass
    read_s = time.perf_counter() - began
    print(json.dumps({"prepare_seconds": prepare_s, "read_seconds": read_s, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb():
    """This process's peak resident set in MB: Linux's VmHWM, which starts afresh at exec. `ru_maxrss` does not:
    Linux carries it over from the forking parent, so a worker started from a large process reported the
    parent's peak (5.9 GB from a 0.2 MB corpus, seen in a test session)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _demo_tokens_per_s(steps=4):
    """Tokens per second of the demo's compiled training step (median of `steps` after two warmups)."""
    from pangu_moe.bench.ep import _step_seconds
    from pangu_moe.config import RunConfig
    from pangu_moe.configs import DEMO_CONFIG
    from pangu_moe.train.trainer import Trainer
    scratch = tempfile.mkdtemp(prefix="bench_data_train_")
    try:
        trainer = Trainer(RunConfig.from_yaml(DEMO_CONFIG), scratch, log=lambda line: None)
        times = [_step_seconds(trainer, batch, step) for step, batch in zip(range(steps + 2), trainer.batches(0))]
        cfg = trainer.cfg
        return cfg.train.batch_size * cfg.model.seq_len / float(np.median(times[2:]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(sizes_mb=SIZES_MB, read_steps=200, log=print, train_tokens_per_s=None):
    """Measure every size; returns {sizes: {mb: figures}, prepare_mb_per_s, read_tokens_per_s, read_over_train,
    peak_rss_mb, rss_growth_mb} (the rates of the largest corpus; `train_tokens_per_s` skips timing the demo)."""
    scratch = tempfile.mkdtemp(prefix="bench_data_")
    sizes = {}
    try:
        for mb in sizes_mb:
            source = os.path.join(scratch, f"c{mb}.jsonl")
            size = synthetic_jsonl(source, mb)
            log(f"bench data: preparing and reading a {size / 1e6:.0f} MB corpus")
            worker_call = ("import sys; from pangu_moe.bench.data import worker; "
                           "worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
            done = subprocess.run([sys.executable, "-c", worker_call, source, os.path.join(scratch, f"p{mb}"),
                                   str(read_steps)], capture_output=True, text=True, cwd=scratch)
            if done.returncode != 0:
                raise RuntimeError(f"bench data worker failed: {done.stderr.strip().splitlines()[-1:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            figures.update(corpus_mb=size / 1e6, prepare_mb_per_s=size / 1e6 / figures["prepare_seconds"],
                           read_tokens_per_s=read_steps * BATCH * SEQ_LEN / figures["read_seconds"])
            sizes[mb] = figures
            shutil.rmtree(os.path.join(scratch, f"p{mb}"), ignore_errors=True)
            os.remove(source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    train = train_tokens_per_s if train_tokens_per_s is not None else _demo_tokens_per_s()
    largest, smallest = sizes[max(sizes)], sizes[min(sizes)]
    return {"sizes": sizes, "read_steps": read_steps, "train_tokens_per_s": train,
            "prepare_mb_per_s": largest["prepare_mb_per_s"], "read_tokens_per_s": largest["read_tokens_per_s"],
            "read_over_train": largest["read_tokens_per_s"] / train, "peak_rss_mb": largest["peak_rss_mb"],
            "rss_growth_mb": largest["peak_rss_mb"] - smallest["peak_rss_mb"]}


def table(result):
    """Human-readable lines for `run`'s result."""
    lines = [f"prepare-data and the prepared reader (byte tokenizer, B={BATCH}, S={SEQ_LEN}, "
             f"{result['read_steps']} batches read)",
             f"  {'corpus MB':>10s} {'prepare MB/s':>13s} {'read tokens/s':>14s} {'peak RSS MB':>12s}"]
    for figures in result["sizes"].values():
        lines.append(f"  {figures['corpus_mb']:10.0f} {figures['prepare_mb_per_s']:13.1f} "
                     f"{figures['read_tokens_per_s']:14,.0f} {figures['peak_rss_mb']:12.0f}")
    lines.append(f"  read_over_train = {result['read_over_train']:.1f}  (reader tokens/s over the demo step's "
                 f"{result['train_tokens_per_s']:,.0f})")
    lines.append(f"  rss_growth_mb = {result['rss_growth_mb']:.1f}  (target <= 64)")
    return "\n".join(lines)
