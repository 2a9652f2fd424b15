"""`pangu-moe bench data`: what preparing and reading a corpus costs, on a corpus with a realistic vocabulary.

The corpus (JSONL, two domains, documents of 40-800 words) is drawn word by word from a Zipf law (exponent
`ZIPF_EXPONENT`) over `WORD_FORMS` word forms spelled from syllables (ASCII, accented, Cyrillic, Greek, CJK,
code-like). As in real text, new words keep appearing as the corpus grows (Heaps' law), and that is what makes a
BPE trainer's tables grow; a fixed word list cannot show it.

Figures (each preparation and the read in a fresh process that has imported nothing of the training stack; a
preparation's peak RSS includes MindSpore's import by the MindRecord writer, about 360 MB at every size, and not
the encode workers, which hold the tokenizer and a few chunks of documents):
- `rss_growth_mb`: peak RSS preparing the largest corpus minus the smallest's (BPE, the default
  `--bpe-sample-mb`).
- `prepare_speedup_workers`: seconds preparing the smallest corpus (BPE) on one core with 1 worker over those on
  N cores with N workers, N the cores available (`workers`). The 1-worker process is pinned to one core
  because the BPE trainer's threads use every core the process may use, whatever `--workers` says.
- `read_over_train`: tokens/s reading one epoch of the largest corpus's training windows at the demo's batch
  shape (B = 16, S = 256) over the tokens/s of the demo's compiled training step (timed in this process).
- `block_time_files_ratio`: seconds reading every block of one domain's training windows when the split is
  held in 44 files over the same when it is one file (a `BLOCK_CORPUS_MB` corpus, byte tokenizer).
- `resume_seconds`: positioning every stream of a `bytes`-mixture resume at step 100,000 with 512 rows
  (8 ranks, 4 domains; a synthetic stream, nothing read or trained).
The byte tokenizer's preparation of the smallest corpus is measured too. `TARGETS` holds the issue's targets,
fixed before the first measurement.
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

from pangu_moe.data.encode_workers import available_cores

SYLLABLES = ("ka", "to", "ri", "mu", "se", "na", "lo", "pe", "shi", "an", "or", "el", "ti", "da", "gu", "ve",
             "ré", "ün", "ña", "ø", "数", "据", "語", "λο", "ми", "ра", "_", "x", "0", "1", "()", "=")
WORD_FORMS = 1 << 20
ZIPF_EXPONENT = 1.07  # English word frequencies' exponent is close to 1
SIZES_MB = (64, 512)
BLOCK_CORPUS_MB = 8
MANY_FILES = 44  # the file count at which the reader was measured 2.8x slower a block than with one file
BATCH, SEQ_LEN = 16, 256
BPE = "bpe:8192"  # the vocabulary of configs/corpus_cpu.yaml
RESUME = {"step": 100_000, "batch_size": 512, "world": 8, "devices_per_node": 2, "weights": (0.4, 0.3, 0.2, 0.1)}
# figure: (comparison, bound); prepare_speedup_workers' bound is per worker (0.8 N).
TARGETS = {"rss_growth_mb": ("<=", 64.0), "read_over_train": (">=", 1.0), "prepare_speedup_workers": (">=", 0.8),
           "block_time_files_ratio": ("<=", 1.2), "resume_seconds": ("<", 5.0)}


def word_forms(count=WORD_FORMS):
    """object [count]: word form k spells k + 1 in base len(SYLLABLES), one syllable a digit (all distinct)."""
    forms = []
    for k in range(1, count + 1):
        parts = []
        while k:
            k, digit = divmod(k, len(SYLLABLES))
            parts.append(SYLLABLES[digit])
        forms.append("".join(parts))
    return np.array(forms, dtype=object)


def synthetic_jsonl(path, megabytes, seed=0, forms=None):
    """Write a JSONL corpus of about `megabytes` MB (module doc; domains prose and code alternate, deterministic in
    `seed`); returns its bytes."""
    rng = np.random.default_rng(seed)
    forms = word_forms() if forms is None else forms
    cdf = np.cumsum(1.0 / np.arange(1, len(forms) + 1) ** ZIPF_EXPONENT)
    cdf /= cdf[-1]
    written, documents = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < megabytes * 1e6:
            lengths = rng.integers(40, 800, 32)
            words = forms[np.minimum(np.searchsorted(cdf, rng.random(lengths.sum())), len(forms) - 1)]
            ends = np.cumsum(lengths)
            lines = []
            for end, length in zip(ends, lengths):
                domain = ("prose", "code")[documents % 2]
                lines.append(json.dumps({"text": " ".join(words[end - length:end]), "domain": domain},
                                        ensure_ascii=False) + "\n")
                documents += 1
            chunk = "".join(lines)
            fh.write(chunk)
            written += len(chunk.encode("utf-8"))
    return written


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


def prepare_worker(source, out, tokenizer, workers, cores="all"):
    """In a fresh process: prepare `source` into `out` with `workers` workers on `cores` cores ("all" or a count,
    set before the tokenizers library starts its threads; Linux only, elsewhere every core); prints one JSON line of
    seconds, peak RSS and counts."""
    if cores != "all" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(cores)])
    from pangu_moe.data.prepare import prepare
    began = time.perf_counter()
    manifest = prepare(source, out, ["prose", "code"], SEQ_LEN, tokenizer=tokenizer, workers=int(workers),
                       log=lambda line: None)
    seconds = time.perf_counter() - began
    counts = manifest["counts"].values()
    print(json.dumps({"prepare_seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "tokens": sum(c["train"]["tokens"] + c["val"]["tokens"] for c in counts),
                      "train_windows": sum(c["train"]["windows"] for c in counts)}))


def read_worker(out):
    """In a fresh process: read one epoch of `out`'s training windows (as many B-row batches as there are training
    windows, uniform mixture: the domains alternate, so the smaller domain's streams wrap into a second epoch
    for the few windows the larger one has more); prints one JSON line of seconds, windows and peak RSS."""
    from pangu_moe.data.prepared import PreparedCorpus, train_batches
    corpus = PreparedCorpus(out, verify=False)
    steps = sum(corpus.windows[d, "train"] for d in corpus.domains) // BATCH
    began = time.perf_counter()
    windows = sum(len(batch[0]) for batch in train_batches(corpus, BATCH, 1, 0, steps, "uniform"))
    print(json.dumps({"read_seconds": time.perf_counter() - began, "windows_read": windows,
                      "peak_rss_mb": peak_rss_mb()}))


def _fresh(cwd, function, *args):
    """Run `function` (a name in this module) on `args` in a fresh interpreter of the installed package, in folder
    `cwd`; returns its JSON line."""
    call = f"import sys; from pangu_moe.bench.data import {function}; {function}(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", call, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"bench data: {function} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def block_seconds(out_one, out_many, domain="prose", passes=3):
    """Seconds reading every block of `domain`'s training windows from two preparations of one corpus (one file;
    MANY_FILES files), block by block alternating between them in a shuffled order, the fastest of `passes`.

    Returns (seconds one file, seconds many files, files of the split in `out_many`). Raises if the two do not
    hold the same windows."""
    from pangu_moe.data.prepared import BLOCK, PreparedCorpus
    one, many = PreparedCorpus(out_one, verify=False), PreparedCorpus(out_many, verify=False)
    windows = one.windows[domain, "train"]
    starts = np.random.default_rng(0).permutation(np.arange(0, windows - BLOCK + 1, BLOCK))
    if not len(starts):
        raise RuntimeError(f"bench data: {domain!r} has {windows} training windows, fewer than a block of {BLOCK}; "
                           f"use a larger block corpus")
    best = [float("inf"), float("inf")]
    for _ in range(passes):
        spent = [0.0, 0.0]
        for start in starts.tolist():
            read = []
            for k, corpus in enumerate((one, many)):
                began = time.perf_counter()
                read.append(corpus.read(domain, "train", start, BLOCK))
                spent[k] += time.perf_counter() - began
            if not np.array_equal(*read):
                raise RuntimeError(f"bench data: block {start} differs between the two preparations")
        best = [min(b, s) for b, s in zip(best, spent)]
    return best[0], best[1], len(many.files[domain, "train"])


def resume_seconds():
    """Seconds positioning the streams of a `bytes` resume (`RESUME`)."""
    from pangu_moe.data.pipeline import sample_domains
    from pangu_moe.data.prepared import stream_positions
    r = RESUME
    weights, layout = np.asarray(r["weights"]), (r["batch_size"], r["world"], r["devices_per_node"])
    began = time.perf_counter()
    stream_positions(r["step"], range(r["batch_size"]), r["batch_size"], r["world"], len(weights), "bytes",
                     lambda indices: sample_domains(indices, "bytes", 0, len(weights), weights, layout))
    return time.perf_counter() - began


def train_tokens_per_s(config=None, steps=4):
    """Tokens per second of a config's compiled training step (default the demo's; the median of `steps` after
    two warmups)."""
    from pangu_moe.bench.ep import _step
    from pangu_moe.config import RunConfig
    from pangu_moe.configs import DEMO_CONFIG
    from pangu_moe.train.trainer import Trainer
    scratch = tempfile.mkdtemp(prefix="bench_data_train_")
    try:
        trainer = Trainer(RunConfig.from_yaml(config or DEMO_CONFIG), scratch, log=lambda line: None)
        times = [_step(trainer, batch, step)[0] for step, batch in zip(range(steps + 2), trainer.batches(0))]
        cfg = trainer.cfg
        return cfg.train.batch_size * cfg.model.seq_len / float(np.median(times[2:]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verdicts(figures, workers):
    """{figure: whether it meets `TARGETS`} (prepare_speedup_workers' bound scaled by `workers`)."""
    met = {}
    for name, (comparison, bound) in TARGETS.items():
        bound = bound * workers if name == "prepare_speedup_workers" else bound
        value = figures[name]
        met[name] = value <= bound if comparison == "<=" else value >= bound if comparison == ">=" else value < bound
    return met


def run(sizes_mb=SIZES_MB, workers=None, log=print, train_rate=None, block_mb=BLOCK_CORPUS_MB, tokenizer=BPE):
    """Measure (module doc); `train_rate` (tokens/s) skips timing the demo's step. Returns {sizes: {mb: figures},
    bytes_tokenizer, one_worker, read: figures, workers, the five figures, met: `verdicts`, train_tokens_per_s}."""
    workers = workers or available_cores()
    scratch = tempfile.mkdtemp(prefix="bench_data_")
    small, large = min(sizes_mb), max(sizes_mb)
    try:
        forms = word_forms()
        sources = {}
        for mb in sizes_mb:
            sources[mb] = os.path.join(scratch, f"c{mb}.jsonl")
            size = synthetic_jsonl(sources[mb], mb, forms=forms)
            log(f"bench data: a {size / 1e6:.0f} MB corpus ({tokenizer}, {workers} workers)")
        sizes = {}
        for mb in sizes_mb:
            sizes[mb] = _fresh(scratch, "prepare_worker", sources[mb], os.path.join(scratch, f"p{mb}"), tokenizer,
                               workers)
            corpus_mb = os.path.getsize(sources[mb]) / 1e6
            sizes[mb].update(corpus_mb=corpus_mb, prepare_mb_per_s=corpus_mb / sizes[mb]["prepare_seconds"])
        log(f"bench data: preparing the {small} MB corpus on 1 core with 1 worker, then with the byte tokenizer")
        one_worker = _fresh(scratch, "prepare_worker", sources[small], os.path.join(scratch, "p1"), tokenizer, 1, 1)
        by_bytes = _fresh(scratch, "prepare_worker", sources[small], os.path.join(scratch, "pb"), "bytes", workers)
        by_bytes["prepare_mb_per_s"] = os.path.getsize(sources[small]) / 1e6 / by_bytes["prepare_seconds"]
        log(f"bench data: reading one epoch of the {large} MB corpus")
        read = _fresh(scratch, "read_worker", os.path.join(scratch, f"p{large}"))
        read["read_tokens_per_s"] = read["windows_read"] * SEQ_LEN / read["read_seconds"]
        for mb in sizes_mb:
            shutil.rmtree(os.path.join(scratch, f"p{mb}"), ignore_errors=True)
            os.remove(sources[mb])
        log(f"bench data: reading blocks from 1 and {MANY_FILES} files")
        block_source = os.path.join(scratch, "blocks.jsonl")
        synthetic_jsonl(block_source, block_mb, forms=forms)
        _fresh(scratch, "prepare_worker", block_source, os.path.join(scratch, "one"), "bytes", workers)
        with open(os.path.join(scratch, "one", "manifest.json"), encoding="utf-8") as fh:
            prose = json.load(fh)["counts"]["prose"]["train"]["windows"]
        per_file = -(-prose // MANY_FILES)  # MANY_FILES files, or a few fewer where the division is uneven
        from pangu_moe.data.prepare import prepare
        prepare(block_source, os.path.join(scratch, "many"), ["prose", "code"], SEQ_LEN, shard_records=per_file,
                log=lambda line: None)
        one_s, many_s, files = block_seconds(os.path.join(scratch, "one"), os.path.join(scratch, "many"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    train = train_rate if train_rate is not None else train_tokens_per_s()
    figures = {"rss_growth_mb": sizes[large]["peak_rss_mb"] - sizes[small]["peak_rss_mb"],
               "prepare_speedup_workers": one_worker["prepare_seconds"] / sizes[small]["prepare_seconds"],
               "read_over_train": read["read_tokens_per_s"] / train,
               "block_time_files_ratio": many_s / one_s, "resume_seconds": resume_seconds()}
    return {"sizes": sizes, "bytes_tokenizer": by_bytes, "one_worker": one_worker, "workers": workers,
            "tokenizer": tokenizer, "read": read, "train_tokens_per_s": train,
            "block_files": files, "block_seconds": {"one_file": one_s, "many_files": many_s},
            **figures, "met": verdicts(figures, workers)}


def table(result):
    """Human-readable lines for `run`'s result."""
    workers = result["workers"]
    lines = [f"prepare-data ({result['tokenizer']} unless said, {workers} workers) and the prepared reader "
             f"(B={BATCH}, S={SEQ_LEN}) on Zipf-vocabulary corpora; measured",
             f"  {'corpus MB':>10s} {'prepare MB/s':>13s} {'peak RSS MB':>12s}"]
    for figures in result["sizes"].values():
        lines.append(f"  {figures['corpus_mb']:10.0f} {figures['prepare_mb_per_s']:13.2f} "
                     f"{figures['peak_rss_mb']:12.0f}")
    by_bytes = result["bytes_tokenizer"]
    lines.append(f"  {min(result['sizes'].values(), key=lambda f: f['corpus_mb'])['corpus_mb']:10.0f} "
                 f"{by_bytes['prepare_mb_per_s']:13.2f} {by_bytes['peak_rss_mb']:12.0f}  (byte tokenizer)")
    read = result["read"]
    lines.append(f"  one epoch read: {read['windows_read']:,} windows at {read['read_tokens_per_s']:,.0f} tokens/s, "
                 f"peak RSS {read['peak_rss_mb']:.0f} MB; the demo step trains {result['train_tokens_per_s']:,.0f}")
    for name, (comparison, bound) in TARGETS.items():
        bound = f"{bound * workers:g} (0.8 x {workers})" if name == "prepare_speedup_workers" else f"{bound:g}"
        verdict = "met" if result["met"][name] else "MISSED"
        lines.append(f"  {name} = {result[name]:.2f}  (target {comparison} {bound}: {verdict})")
    lines.append(f"  (block reads: {result['block_files']} files against 1)")
    return "\n".join(lines)
