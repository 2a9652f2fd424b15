"""Fault injection: SIGKILL-and-resume cycles of a training run, and a fuzz of malformed configs,
corpora and checkpoints.

    python -m tests.faults.driver [--kills K] [--steps N] [--seed S] [--out DIR] [--demo]

Prints one line:
    faults: kills survived A/K, resumed runs identical yes|no, bad inputs tried B, tracebacks C, lost steps D

- Kills: the run (`pangu-moe train` in a subprocess, a tiny model, or the demo model with `--demo`)
  is killed with SIGKILL K times, each time at a random moment after a random step (checkpoints every
  2 steps, so kills land before, during and after checkpoint writes), and restarted with `--resume`
  (or afresh when no checkpoint exists yet). A kill is survived when the next start continues without
  an error. The finished run's metrics (every logged loss, gradient norm and routing count) and its
  final validation loss are compared with an uninterrupted run's, exactly. Lost steps: logged steps of
  the uninterrupted run missing from the resumed one's metrics.jsonl.
- Fuzz: every malformed input must end with exit code 2 and one line on stderr that names the
  problem (an expected fragment per case); anything else counts as a traceback.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from pangu_moe import cli
from pangu_moe.config import RunConfig
from pangu_moe.train.checkpoint import list_checkpoints
from pangu_moe.train.metrics import read

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {
    "model": {"hidden": 32, "num_heads": 2, "num_dense_layers": 1, "num_moe_layers": 2, "ffn_hidden": 64,
              "seq_len": 32},
    "moe": {"num_experts": 4, "expert_hidden": 64, "num_groups": 2, "top_k": 1, "slot_policy": "random",
            "topk": {"jitter_eps": 0.1}},  # training noise, which a resume must reproduce too
    "train": {"batch_size": 4, "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 2, "log_every": 1,
              "eval_batches": 2, "checkpoint_every": 2, "keep_checkpoints": 3},
    "data": {"source": "demo", "max_bytes_per_domain": 40000},
    "runtime": {"mode": "graph", "seed": 11},
}
COMPARED = ("step", "loss", "lm_loss", "aux_loss", "z_loss", "locality_loss", "lr", "grad_norm", "layers",
            "val_loss", "val_bpb")


# ---- kills -------------------------------------------------------------------------------------------

def _train_command(config, out, resume):
    return [sys.executable, "-m", "pangu_moe.cli", "train", "--config", config, "--out", out] + \
           (["--resume"] if resume else [])


def _logged_step(run_dir):
    try:
        return max(r["step"] for r in read(os.path.join(run_dir, "metrics.jsonl")))
    except (OSError, ValueError):  # not written yet, or a partial line being written
        return 0


def _start(config, out, workdir):
    resume = bool(list_checkpoints(out))
    return subprocess.Popen(_train_command(config, out, resume), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))


def kill_cycles(config, steps, kills, workdir, rng, log):
    """Run `config` uninterrupted and under `kills` SIGKILLs; returns the summary fields."""
    reference = os.path.join(workdir, "reference")
    done = subprocess.run(_train_command(config, reference, False), cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO))
    if done.returncode:
        raise RuntimeError(f"the uninterrupted run failed: {done.stderr[-2000:]}")
    victim = os.path.join(workdir, "victim")
    survived = tracebacks = 0
    for kill in range(kills):
        done = _logged_step(victim)  # kill somewhere after this start's resume point, spread over the run
        target = rng.randint(min(done + 1, steps - 4), steps - 4)
        proc = _start(config, victim, workdir)  # afresh, or the resume after the previous kill
        while proc.poll() is None and _logged_step(victim) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))  # somewhere in the next step or two, checkpoint writes included
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        tracebacks += "Traceback" in err
        checkpoints = list_checkpoints(victim)
        log(f"kill {kill + 1}/{kills}: target step {target}, killed after logged step {_logged_step(victim)} "
            f"(newest checkpoint {checkpoints[-1][0] if checkpoints else '-'}), exit {proc.returncode}")
        if proc.returncode != -signal.SIGKILL:
            log(f"start {kill + 1} ended by itself: {err.strip()[-300:]}")
            break
        survived += kill > 0  # the start after the previous kill ran until this kill
    proc = _start(config, victim, workdir)
    err = proc.communicate()[1].decode(errors="replace")
    tracebacks += "Traceback" in err
    if proc.returncode == 0:
        survived += kills > 0  # the start after the last kill finished the run
    else:
        log(f"the final resume failed: {err.strip()[-300:]}")
    want = [{k: r[k] for k in COMPARED if k in r} for r in read(os.path.join(reference, "metrics.jsonl"))]
    got = [{k: r[k] for k in COMPARED if k in r} for r in read(os.path.join(victim, "metrics.jsonl"))] \
        if os.path.exists(os.path.join(victim, "metrics.jsonl")) else []
    summaries = [_summary(reference), _summary(victim)]
    identical = want == got and summaries[0] is not None and summaries[0] == summaries[1]
    lost = len({r["step"] for r in want} - {r["step"] for r in got})
    return {"kills": kills, "survived": survived, "identical": identical, "tracebacks": tracebacks, "lost": lost}


def _summary(run_dir):
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        s = json.load(fh)
    return {k: s[k] for k in ("steps", "val_loss", "val_bpb", "dropped_fraction", "inter_node_fraction")}


# ---- fuzz --------------------------------------------------------------------------------------------

def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield from _leaf_fields(f.type, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def _with(path, value):
    d = json.loads(json.dumps(TINY))
    section, key = path.split(".", 1)
    node = d.setdefault(section, {})
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return yaml.safe_dump(d)


def malformed_configs():
    """[(name, YAML text, expected fragment of the error)]: a wrong type for every field, a value out of
    range for every bounded one, and structural and cross-field mistakes."""
    cases = []
    for path, f in _leaf_fields(RunConfig):
        wrong = {"str": 123, "bool": "maybe", "float": "fast", "int": "many"}.get(getattr(f.type, "__name__", ""), 5)
        cases.append((f"type {path}", _with(path, wrong), path))
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if lo is not None and f.type in (int, float):
            cases.append((f"below {path}", _with(path, lo if f.metadata.get("lo_open") else lo - 1), path))
        if hi is not None and f.type in (int, float):
            cases.append((f"above {path}", _with(path, hi if f.metadata.get("hi_open") else hi + 1), path))
        if f.metadata.get("choices"):
            cases.append((f"choice {path}", _with(path, "no_such_choice"), path))
    cases += [
        ("unknown key", _with("moe.no_such_key", 1), "moe.no_such_key"),
        ("unknown section", yaml.safe_dump({**TINY, "optimizer": {"lr": 1}}), "optimizer"),
        ("section not a mapping", yaml.safe_dump({**TINY, "moe": [1, 2]}), "moe"),
        ("top level a list", "- 1\n- 2\n", "top level must be a mapping"),
        ("YAML syntax", "model: {hidden: 32\n", "not valid YAML"),
        ("tab indentation", "model:\n\thidden: 32\n", "not valid YAML"),
        ("binary garbage", "\x00\x01\x02\xff", "not valid YAML"),
        ("NaN learning rate", _with("train.lr", float("nan")), "train.lr"),
        ("infinite learning rate", _with("train.lr", float("inf")), "train.lr"),
        ("top_k above the group's experts", _with("moe.top_k", 3), "moe.top_k"),
        ("groups not the domains", _with("moe.num_groups", 3), "moe.num_groups"),
        ("heads not dividing hidden", _with("model.num_heads", 3), "model.num_heads"),
        ("vocabulary below the bytes", _with("model.vocab_size", 100), "model.vocab_size"),
        ("experts not divisible by ranks", _with("parallel.devices_per_node", 3), "parallel"),
        ("batch not divisible by domains", _with("train.batch_size", 3), "train.batch_size"),
    ]
    return cases


def _jsonl(lines):
    return "".join(line + "\n" for line in lines)


GOOD = [json.dumps({"text": "x" * 2000, "domain": d}) for d in ("prose", "code") for _ in range(3)]


def malformed_corpora():
    """[(name, source, {relative path: bytes or None for a folder}, data.path, expected fragment)]."""
    j = "corpus.jsonl"
    cases = [
        ("missing file", "jsonl", {}, j, "no such file"),
        ("empty file", "jsonl", {j: b""}, j, "has no text"),
        ("invalid JSON line", "jsonl", {j: _jsonl(GOOD + ['{"text": "a", "domain"']).encode()}, j,
         ":7: not valid JSON"),
        ("non-UTF-8 line", "jsonl", {j: _jsonl(GOOD).encode() + b'{"text": "\xff", "domain": "code"}\n'}, j,
         ":7: not UTF-8"),
        ("line is a list", "jsonl", {j: _jsonl(GOOD + ["[1, 2]"]).encode()}, j, ":7: must be an object"),
        ("missing text", "jsonl", {j: _jsonl(GOOD + ['{"domain": "code"}']).encode()}, j, ":7: must be an object"),
        ("text not a string", "jsonl", {j: _jsonl(GOOD + ['{"text": 5, "domain": "code"}']).encode()}, j,
         ":7: must be an object"),
        ("domain not a string", "jsonl", {j: _jsonl(GOOD + ['{"text": "a", "domain": 1}']).encode()}, j,
         ":7: must be an object"),
        ("unknown domain", "jsonl", {j: _jsonl(GOOD + ['{"text": "a", "domain": "poetry"}']).encode()}, j,
         "unknown domain 'poetry'"),
        ("a domain without text", "jsonl", {j: _jsonl(GOOD[:3]).encode()}, j, "domain 'code' has no text"),
        ("too little text", "jsonl", {j: _jsonl([json.dumps({"text": "ab", "domain": d})
                                                 for d in ("prose", "code")]).encode()}, j, "need at least 33"),
        ("folder instead of file", "jsonl", {j: None}, j, "no such file"),
        ("partial last line", "jsonl", {j: _jsonl(GOOD).encode() + b'{"text": "abc'}, j, ":7: not valid JSON"),
        ("NUL bytes", "jsonl", {j: b"\x00" * 64 + b"\n"}, j, ":1: not valid JSON"),
        ("byte order mark", "jsonl", {j: b"\xef\xbb\xbf" + _jsonl(GOOD).encode()}, j, ":1: not valid JSON"),
        ("only blank lines", "jsonl", {j: b"\n\n   \n"}, j, "has no text"),
        ("missing folder", "folders", {}, "corpus", "no such folder"),
        ("file instead of folder", "folders", {"corpus": b"text"}, "corpus", "no such folder"),
        ("unknown sub-folder", "folders", {"corpus/prose/a.txt": b"x" * 2000, "corpus/code/a.txt": b"x" * 2000,
                                           "corpus/poetry/a.txt": b"x"}, "corpus", "'poetry' is an unknown domain"),
        ("non-UTF-8 file", "folders", {"corpus/prose/a.txt": b"x" * 2000, "corpus/code/a.txt": b"\xff\xfe" * 100},
         "corpus", "a.txt: not UTF-8"),
        ("empty domain folder", "folders", {"corpus/prose/a.txt": b"x" * 2000, "corpus/code": None}, "corpus",
         "domain 'code' has no text"),
        ("no .txt files", "folders", {"corpus/prose/a.md": b"x" * 2000, "corpus/code/b.md": b"x" * 2000}, "corpus",
         "has no text"),
        ("whitespace only", "folders", {"corpus/prose/a.txt": b" " * 10, "corpus/code/a.txt": b"x" * 2000},
         "corpus", "domain 'prose' has"),
    ]
    return cases


def _run_cli(argv):
    """(exit code, stderr) of `pangu-moe argv` in this process; an escaping exception is a traceback."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # a traceback the user would have seen
            return None, f"{type(e).__name__}: {e}"
    return code, err.getvalue()


def _judge(name, code, err, expected, log):
    """True if the input was refused with exit 2 and one stderr line containing `expected`."""
    ok = code == 2 and err.count("\n") == 1 and expected in err
    if not ok:
        log(f"fuzz {name}: exit {code}, stderr {err.strip()[:300]!r} (expected {expected!r})")
    return ok


def fuzz(workdir, log):
    """Run every malformed config and corpus; returns (inputs tried, tracebacks, misreported)."""
    tried = tracebacks = misreported = 0
    for i, (name, text, expected) in enumerate(malformed_configs()):
        path = os.path.join(workdir, f"config_{i}.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
        code, err = _run_cli(["config", "--show", path])
        tried += 1
        tracebacks += code is None
        misreported += not _judge(f"config {name}", code, err, expected, log)
    for i, (name, source, files, data_path, expected) in enumerate(malformed_corpora()):
        root = os.path.join(workdir, f"corpus_{i}")
        os.makedirs(root)
        for rel, content in files.items():
            target = os.path.join(root, rel)
            if content is None:
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(content)
        config = os.path.join(root, "config.yaml")
        d = json.loads(json.dumps(TINY))
        d["data"] = {"source": source, "path": os.path.join(root, data_path), "max_bytes_per_domain": 40000}
        d["train"]["steps"] = 2  # >= warmup_steps; a corpus that loaded would train 2 steps
        with open(config, "w", encoding="utf-8") as fh:
            yaml.safe_dump(d, fh)
        code, err = _run_cli(["train", "--config", config, "--out", os.path.join(root, "run")])
        tried += 1
        tracebacks += code is None
        misreported += not _judge(f"corpus {name}", code, err, expected, log)
    return tried, tracebacks, misreported


# ---- main --------------------------------------------------------------------------------------------

def run(kills=5, steps=24, seed=0, out=None, demo=False, log=print, sets=(), fuzzing=True):
    """Kill cycles then fuzz; returns the summary dict (also printed by `main`). `sets`: "section.key=value"
    overrides of the tiny config; `fuzzing` False skips the fuzz (bad_inputs 0)."""
    rng = random.Random(seed)
    workdir = out or tempfile.mkdtemp(prefix="faults_")
    os.makedirs(workdir, exist_ok=True)
    if demo:
        cfg = RunConfig.from_yaml(os.path.join(REPO, "configs", "demo_cpu.yaml"),
                                  [f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
                                   "train.keep_checkpoints=3", f"train.eval_every={steps}"]).to_dict()
    else:
        cfg = RunConfig.from_dict(TINY, [f"train.steps={steps}", f"train.eval_every={steps}", *sets]).to_dict()
    config = os.path.join(workdir, "run.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    result = kill_cycles(config, steps, kills, workdir, rng, log)
    tried, tracebacks, misreported = fuzz(workdir, log) if fuzzing else (0, 0, 0)
    result.update(bad_inputs=tried, misreported=misreported, tracebacks=result["tracebacks"] + tracebacks)
    return result


def summary_line(r):
    return (f"faults: kills survived {r['survived']}/{r['kills']}, resumed runs identical "
            f"{'yes' if r['identical'] else 'no'}, bad inputs tried {r['bad_inputs']} ({r['misreported']} without a "
            f"one-line message naming the problem), tracebacks {r['tracebacks']}, lost steps {r['lost']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--demo", action="store_true", help="kill the demo model instead of the tiny one")
    args = parser.parse_args(argv)
    result = run(args.kills, args.steps, args.seed, args.out, args.demo,
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary_line(result))
    return 0 if result["survived"] == result["kills"] and result["identical"] and not result["tracebacks"] \
        and not result["lost"] and not result["misreported"] else 1


if __name__ == "__main__":
    sys.exit(main())
