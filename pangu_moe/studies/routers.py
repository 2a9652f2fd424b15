"""The router study: the demo model trained with the same data and steps under each arm, over several seeds.

Setting (our choices, printed with the results):
- the demo config (`configs/demo_cpu.yaml`) with one expert group (G = 1: the routers choose among all
  E = 8 experts, as in the LocMoE paper's HashMoE / SwitchMoE / LocMoE comparison);
- a 2-node x 2-device topology, 2 experts per device, on the local backend: the ranks are virtual,
  the traffic is counted exactly (`accounting.traffic`);
- `data.mixture=by_node`: node n's ranks train on domain n (prose on node 0, code on node 1). With
  every rank holding the same mix no router sharing its weights across ranks could prefer a rank's
  local experts; with domains placed by node, locality is learnable from the token's content;
- the arms (`ARMS`): `dense`, one expert that every token reaches (capacity factor 1.25 never binds), so
  the same active parameters as K = 1; `rre` (hash routing, HashMoE); `topk` (K = 1: Switch); `topk_k2` (K = 2,
  twice the expert FLOPs: Switch's K = 1 vs K = 2 comparison); `locmoe_mu*`,
  LocMoE at locality weights mu in `MUS` (capacity from the capacity factor, like the others, so that the
  comparison isolates routing); `locmoe_plus_{tcr,ecr,hybrid}`, LocMoE+ with each keep rule (live capacity
  re-estimated every 50 steps by Corollary 6, its ceiling the capacity-factor capacity; hybrid switches
  from TCR to ECR at half the steps), at the mu the sweep chose (`choose_mu`);
- seeds: run seed s drives the initial weights, the data order and the routing tables, the same for every
  arm, so differences between arms are paired by seed (`studies.stats.paired_difference`); `SEEDS` by default,
  the fewest at which dense - Switch was resolved with a margin at 200 steps;
- validation at the end only; the load statistics cover the final 20% of the steps, the per-rank balance
  (`accounting.traffic.rank_balance`) the whole run and its final 20%.

Every figure is reported as {mean, ci95} over the seeds (Student's t; no interval for one seed), and
`val_bpb_vs_switch`, `dropped_vs_switch`, `inter_node_vs_switch` are the paired differences to `topk`.

Cost figures per run (`cost_figures`), over the logged steps, each at the capacity bucket the step
trained with (`capacity_bucket` in metrics.jsonl): `layer_ms`, the forward + backward time of all MoE layers
(measured after training on the trained layers, `bench.moe_layer.moe_layers_seconds`, one measurement per
bucket); `step_ms`, the whole training step (from tokens_per_s); `expert_rows_per_step`, the buffer rows the
experts multiply (L x W x E x C: empty slots cost a row); `exchange_bytes_per_step`, what a padded
all-to-all of those buffers moves between the W ranks, there and back (2 x L x (W - 1) x E x C x H values
of `precision.BYTES` bytes each: 4 in fp32); `capacity_ratio`, the mean capacity in force over the factor-1.1 capacity;
`layer_split_ms`, at the bucket most steps trained with, the whole layer and each phase (route, dispatch,
experts with the exchange, combine; `bench.moe_layer.moe_layers_split`) as median, min and max of `repeats`
rounds, summed over the layers: where a router's layer time goes.
"""
import json
import os
import sys
import time

from pangu_moe import report
from pangu_moe.config import ConfigError, RunConfig
from pangu_moe.report.runs import load_run
from pangu_moe.studies.stats import mean_ci95, paired_difference

MUS = (0.0, 0.001, 0.01, 0.1)  # the LocMoE locality weights swept


def _mu_name(mu):
    return f"locmoe_mu{mu:g}"


ARMS = {"dense": ["moe.num_experts=1"], "rre": ["moe.router=rre"], "topk": ["moe.router=topk"],
        "topk_k2": ["moe.router=topk", "moe.top_k=2"],
        **{_mu_name(mu): ["moe.router=locmoe", f"moe.locmoe.locality_coeff={mu}"] for mu in MUS},
        **{f"locmoe_plus_{rule}": ["moe.router=locmoe_plus", f"moe.locmoe_plus.keep_rule={rule}",
                                   "moe.locmoe_plus.switch_ratio=0"] for rule in ("tcr", "ecr", "hybrid")}}
SWITCH = "topk"
CAPACITY_ESTIMATOR = "capacity_need.corollary6_need"  # LocMoE+'s re-estimate; studies without it used the old one
SETTING = ["moe.num_groups=1", "parallel.nodes=2", "parallel.devices_per_node=2", "data.mixture=by_node"]
SEED = 1234  # the first seed; seed i of the study is SEED + i
# Default seeds: at 200 steps, dense - Switch val bpb is resolved from 4 seeds on (+0.090 +- 0.060) and
# 5 keep a margin (+0.078 +- 0.053); 3 are not enough (+0.090 +- 0.115). Doubling the steps at 3 seeds costs
# the same time. Measured: docs/results/2026-12-05-dense-vs-switch.md.
SEEDS = 5
COST_FIELDS = ("layer_ms", "step_ms", "expert_rows_per_step", "exchange_bytes_per_step")
CAPACITY_FIELDS = ("capacity_first", "capacity_last")  # the capacity in force at the first and last logged step
FIELDS = ("val_bpb", "max_over_mean_load", "dead_experts", "inter_node_fraction", "capacity_ratio",
          "dropped_fraction", "tokens_per_s")
PAIRED = {"val_bpb_vs_switch": "val_bpb", "dropped_vs_switch": "dropped_fraction",
          "inter_node_vs_switch": "inter_node_fraction"}
RANK_FIELDS = ("drop_rate", "max_over_mean_load", "dead_experts")  # of summary.json's rank_balance(_last)


def study_configs(config_path, steps, seed=SEED, mu=None, overrides=()):
    """{arm: RunConfig} for one seed (validated; see the module docstring). `mu`: the LocMoE+ arms' locality
    weight (default the config's)."""
    schedule = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                f"train.warmup_steps={min(30, steps)}", f"runtime.seed={seed}",
                f"moe.locmoe_plus.switch_step={max(1, steps // 2)}"]
    plus = [] if mu is None else [f"moe.locmoe_plus.locality_coeff={mu}"]
    from pangu_moe.checks import check
    return {name: check(RunConfig.from_yaml(config_path, [*SETTING, *schedule, *extra,
                                                          *(plus if name.startswith("locmoe_plus") else []),
                                                          *overrides]))
            for name, extra in ARMS.items()}


def choose_mu(per_arm):
    """The LocMoE locality weight of the sweep: the lowest mean inter-node fraction among the mu whose drop rate
    is at most Switch's and whose mean val bpb is within 3% of Switch's; the smallest mu if none qualifies.

    "At most Switch's" is judged on the paired differences over seeds: a drop rate whose excess over Switch's
    is not resolved (the 95% interval reaches 0) counts as at most Switch's, as the study's other comparisons
    do; comparing bare means would let a 0.0003 difference in a noisy mean decide. `per_arm`: {arm: [per-seed
    figures]} holding topk and the locmoe_mu* arms, seeds paired by position. Returns (mu, why)."""
    def mean(arm, field):
        return sum(r[field] for r in per_arm[arm]) / len(per_arm[arm])

    def drops_no_more(arm):
        excess = paired_difference([r["dropped_fraction"] for r in per_arm[arm]],
                                   [r["dropped_fraction"] for r in per_arm[SWITCH]])
        return excess["mean"] - (excess["ci95"] or 0.0) <= 0.0
    switch_bpb = mean(SWITCH, "val_bpb")
    ok = [mu for mu in MUS if drops_no_more(_mu_name(mu)) and mean(_mu_name(mu), "val_bpb") <= 1.03 * switch_bpb]
    if not ok:
        return MUS[0], "no mu kept the drop rate at Switch's with val bpb within 3%: the smallest"
    best = min(ok, key=lambda mu: mean(_mu_name(mu), "inter_node_fraction"))
    return best, (f"lowest inter-node fraction among mu {list(ok)} (drop rate not resolved above Switch's, val "
                  f"bpb within 3%)")


def aggregate(per_arm):
    """{arm: [per-seed figures]} (seeds in the same order for every arm) -> {arm: {field: {mean, ci95, n}}} with
    the paired differences to Switch (`PAIRED`) and the per-rank balance worst-rank and mean figures."""
    out = {}
    for arm, runs in per_arm.items():
        row = {field: mean_ci95([r[field] for r in runs]) for field in (*FIELDS, *COST_FIELDS, *CAPACITY_FIELDS)}
        if SWITCH in per_arm:
            for name, field in PAIRED.items():
                row[name] = paired_difference([r[field] for r in runs], [r[field] for r in per_arm[SWITCH]])
        for window in ("rank_balance", "rank_balance_last"):
            for figure in RANK_FIELDS:
                for summary in ("worst_rank", "mean_over_ranks"):
                    row[f"{window}_{figure}_{summary}"] = mean_ci95([r[window][figure][summary] for r in runs])
        if all("layer_split_ms" in r for r in runs):  # runs of an earlier version have no split
            row["layer_split_ms"] = {part: mean_ci95([r["layer_split_ms"][part]["median_ms"] for r in runs])
                                     for part in ("layer", "route", "dispatch", "experts", "combine")}
        out[arm] = row
    return out


def run(config_path, steps, out, seeds=SEEDS, overrides=(), log=None, arms=None):
    """Train every arm (or those named in `arms`) for each seed into OUT/<arm>/seed<i>, the LocMoE+ arms last at
    the sweep's mu; write OUT/study.json and the report of seed 0's runs (OUT/report). Returns
    {"steps", "seeds", "seconds", "mu", "mu_why", "arms": `aggregate`, "runs": {arm: [per-seed figures]}}."""
    from pangu_moe.train.trainer import check_run_dir
    log = log or (lambda line: print(line, file=sys.stderr))
    unknown = sorted(set(arms or ()) - set(ARMS))
    if unknown:
        raise ConfigError(f"--arms: {unknown[0]!r} is not a study arm; choose from {', '.join(ARMS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds = {seeds}: must be >= 1")
    names = [a for a in ARMS if not arms or a in arms]
    for name in names:
        for i in range(seeds):
            check_run_dir(study_configs(config_path, steps, SEED + i, overrides=overrides)[name],
                          os.path.join(out, name, f"seed{i}"), False)  # refuse to mix with an earlier study up front
    began = time.perf_counter()
    per_arm, mu, why = {}, None, "no LocMoE sweep in this study"

    def train(name, i, cfg):
        log(f"== {name} seed {i} (run seed {SEED + i})")
        per_arm.setdefault(name, []).append(run_isolated(cfg, os.path.join(out, name, f"seed{i}")))

    for i in range(seeds):
        configs = study_configs(config_path, steps, SEED + i, overrides=overrides)
        for name in names:
            if not name.startswith("locmoe_plus"):
                train(name, i, configs[name])
    if SWITCH in per_arm and all(_mu_name(m) in per_arm for m in MUS):
        mu, why = choose_mu(per_arm)
        log(f"LocMoE locality weight: mu = {mu:g} ({why})")
    for i in range(seeds):
        configs = study_configs(config_path, steps, SEED + i, mu, overrides)
        for name in names:
            if name.startswith("locmoe_plus"):
                train(name, i, configs[name])
    result = {"steps": steps, "seeds": seeds, "seconds": time.perf_counter() - began, "mu": mu, "mu_why": why,
              "capacity_estimator": CAPACITY_ESTIMATOR,
              "arms": aggregate({n: per_arm[n] for n in names}), "runs": {n: per_arm[n] for n in names}}
    with open(os.path.join(out, "study.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    report.write([load_run(name, os.path.join(out, name, "seed0")) for name in names], os.path.join(out, "report"),
                 log)
    return result


def train_one(config, run_dir):
    """Train one run and return its study figures (`FIELDS`, `cost_figures`, the per-rank balance). Progress goes
    to stderr. `config`: a RunConfig as a dict."""
    from pangu_moe.train.trainer import Trainer
    trainer = Trainer(RunConfig.from_dict(config), run_dir, lambda line: print(line, file=sys.stderr, flush=True))
    summary = trainer.train()
    return {**{f: summary[f] for f in FIELDS}, **cost_figures(trainer, summary),
            "rank_balance": summary["rank_balance"], "rank_balance_last": summary["rank_balance_last"]}


def in_fresh_process(function, *args):
    """function(*args) in a spawned process, its result returned: a process that trained run after run kept every
    run's compiled graphs and was killed for memory (exit 137) on its 7th demo-sized run beside a test session on
    this 24 GB machine. `function` must be importable at module level; args and result picklable."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def run_isolated(cfg, run_dir):
    """`train_one` in a fresh process (`in_fresh_process`)."""
    return in_fresh_process(train_one, cfg.to_dict(), run_dir)


def steps_for_budget(config_path, minutes, seeds=SEEDS, overrides=(), arms=None, probe_steps=6, log=None):
    """Training steps per run so that the study (every arm in `arms`, default all, times `seeds`) takes about
    `minutes`: a `topk` run of `probe_steps` steps is timed as the study runs it (`run_isolated`, in a scratch
    folder); its wall time less the timed steps is the per-run overhead (process start, build, compile,
    evaluation, cost figures). Returns an int >= 10."""
    import shutil
    import tempfile
    scratch = tempfile.mkdtemp(prefix="study_probe_")
    try:
        cfg = study_configs(config_path, probe_steps, overrides=overrides)[SWITCH]
        began = time.perf_counter()
        figures = run_isolated(cfg, os.path.join(scratch, "probe"))
        wall = time.perf_counter() - began
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    step = cfg.train.batch_size * cfg.model.seq_len / figures["tokens_per_s"]
    overhead = max(0.0, wall - probe_steps * step)
    runs = len([a for a in ARMS if not arms or a in arms]) * seeds
    steps = budget_steps(minutes, runs, step, overhead)
    (log or (lambda line: print(line, file=sys.stderr)))(
        f"budget {minutes:g} min for {runs} runs: {step:.2f} s a step, {overhead:.0f} s a run besides -> {steps} steps")
    return steps


def budget_steps(minutes, runs, step_seconds, overhead_seconds):
    """Steps a run so that `runs` runs of (overhead + steps x step) seconds fit in `minutes`; at least 10."""
    return max(10, int((minutes * 60 / runs - overhead_seconds) / step_seconds))


def cost_figures(trainer, summary, repeats=5):
    """`COST_FIELDS` and `CAPACITY_FIELDS` of a trained run (see the module docstring)."""
    from mindspore import Tensor
    from pangu_moe.bench.moe_layer import moe_layers_seconds, moe_layers_split
    from pangu_moe.precision import BYTES
    from pangu_moe.train.metrics import read
    cfg = trainer.cfg
    records = [r for r in read(os.path.join(trainer.run_dir, "metrics.jsonl")) if "capacity_bucket" in r]
    buckets = [r["capacity_bucket"] for r in records]
    in_force = [sum(layer["capacity"] for layer in r["layers"]) / len(r["layers"]) for r in records]  # layer mean
    input_ids, _, domain_ids = next(trainer.batches(0))
    inputs = trainer.model.moe_inputs(Tensor(input_ids), Tensor(domain_ids), trainer.capacity)
    seconds = {c: moe_layers_seconds(trainer.model, inputs, c, repeats) for c in sorted(set(buckets))}
    common = max(set(buckets), key=buckets.count)  # the bucket most steps trained with
    layers, world, experts = cfg.model.num_moe_layers, trainer.topology.world_size, cfg.moe.num_experts
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    mean = sum(buckets) / len(buckets)
    return {"layer_ms": 1e3 * sum(seconds[c] for c in buckets) / len(buckets),
            "step_ms": 1e3 * tokens_per_step / summary["tokens_per_s"] if summary["tokens_per_s"] else 0.0,
            "expert_rows_per_step": layers * world * experts * mean,
            "exchange_bytes_per_step": 2 * layers * (world - 1) * experts * mean * cfg.model.hidden
                                       * BYTES[cfg.train.precision],
            "capacity_first": in_force[0], "capacity_last": in_force[-1],
            "layer_split_ms": {"capacity_bucket": common, **moe_layers_split(trainer.model, inputs, common, repeats)}}


def table(result):
    """A human table, one row per arm (means, ± the 95% half-width where there is one), and the paired
    differences to Switch."""
    def cell(x, fmt):
        return fmt.format(x["mean"]) + ("" if x["ci95"] is None else "±" + fmt.replace("+", "").format(x["ci95"]))
    lines = [f"{result['steps']} steps x {result['seeds']} seeds, {result['seconds'] / 60:.1f} min; "
             f"LocMoE+ at mu = {result['mu']} ({result['mu_why']})",
             f"{'arm':20s} {'val_bpb':>14s} {'vs switch':>16s} {'dropped':>14s} {'worst-rank drop':>16s} "
             f"{'inter':>14s} {'layer_ms':>12s} {'MB/step':>8s}"]
    for name, r in result["arms"].items():
        vs = cell(r["val_bpb_vs_switch"], "{:+.3f}") if "val_bpb_vs_switch" in r else "-"
        lines.append(f"{name:20s} {cell(r['val_bpb'], '{:.3f}'):>14s} {vs:>16s} "
                     f"{cell(r['dropped_fraction'], '{:.3f}'):>14s} "
                     f"{cell(r['rank_balance_drop_rate_worst_rank'], '{:.3f}'):>16s} "
                     f"{cell(r['inter_node_fraction'], '{:.3f}'):>14s} {cell(r['layer_ms'], '{:.0f}'):>12s} "
                     f"{r['exchange_bytes_per_step']['mean'] / 1e6:8.2f}")
    return "\n".join(lines)
