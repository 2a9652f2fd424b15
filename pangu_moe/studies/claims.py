"""`pangu-moe claims`: the claims table, docs/results/claims.md, from the studies' outputs.

One row per testable claim of LocMoE, LocMoE+, Kool et al. and Switch: the claim, our figure with its 95%
interval, the setting it was measured in, and a verdict computed from that figure:

- reproduced: the interval lies on the claim's side (a paired difference to Switch that excludes 0 in the
  claimed direction; a ratio whose whole interval is past the claimed threshold). An equivalence claim
  ("keeps quality", "at least as well") is reproduced only when its interval lies inside a stated margin
  (`non_inferior`), never because a difference was not resolved;
- not reproduced: the interval lies on the other side, or past the margin;
- not resolved: the interval straddles 0 or the margin at this number of seeds, or there is no interval
  (one seed): a larger study could still decide;
- shown by a test (`BY_TEST`): a mathematical property checked exactly by a named test; the row names it,
  and `pangu-moe claims` fills it in only from that test's recorded outcome (`--tests`), never by hand;
- not testable at this scale: the claim needs what a 2-core CPU cannot give (cluster time), with why.

Inputs: one or more router studies' `study.json` (`studies.routers`; each claim from the study with the most
seeds that measured it), optionally the Kool study's JSON
(`pangu-moe study kool --json`) and `pangu-moe bench precision --json`. Rows whose input is missing say
which command produces it. Nothing here is typed in by hand: rerun the command after rerunning a study.
"""
import json

from pangu_moe.config import ConfigError
from pangu_moe.studies.stats import resolved

REPRODUCED, NOT_REPRODUCED, NOT_RESOLVED, NOT_TESTABLE = ("reproduced", "not reproduced", "not resolved",
                                                           "not testable at this scale")
BY_TEST = "shown by a test"
KOOL_PURITY_MARGIN = 0.02  # "at least as well": skip's routing purity at most 0.02 below balanced's
QUALITY_MARGIN = 0.03      # "keeps quality": val bpb at most 3% of Switch's worse
PRECISION_SEEDS = 3        # the selective-precision row needs this many seeds, with intervals


def interval(x, fmt="{:+.3f}"):
    """{mean, ci95} -> "mean ± half-width" (no interval for one seed)."""
    text = fmt.format(x["mean"])
    return text if x["ci95"] is None else f"{text} ± {fmt.replace('+', '').format(x['ci95'])}"


def direction(diff, lower_is_claimed):
    """Verdict of a paired difference whose claimed sign is negative (`lower_is_claimed`) or positive."""
    if not resolved(diff):
        return NOT_RESOLVED
    return REPRODUCED if (diff["mean"] < 0) == lower_is_claimed else NOT_REPRODUCED


def router_rows(study):
    """Claims rows measured by the router study (`studies.routers.run`'s result)."""
    arms, setting = study["arms"], (f"router study: {study['steps']} steps x {study['seeds']} seeds, demo model, "
                                    f"2 nodes x 2 devices, E = 8")
    rows = []
    from pangu_moe.studies.routers import MUS, SWITCH, choose_mu
    runs = study.get("runs", {})
    if SWITCH in runs and all(f"locmoe_mu{mu:g}" in runs for mu in MUS):
        mu, why = choose_mu(runs)  # the current rule on the study's per-seed figures
        locmoe, chosen = f"locmoe_mu{mu:g}", f"mu = {mu:g}, chosen by the sweep: {why}"
    elif study.get("mu") is not None:
        locmoe, chosen = f"locmoe_mu{study['mu']:g}", f"mu = {study['mu']:g}, chosen by the sweep: {study['mu_why']}"
    else:  # no sweep in this study: its one LocMoE arm, if any
        locmoe = next((name for name in arms if name.startswith("locmoe_mu")), None)
        chosen = f"mu = {locmoe[len('locmoe_mu'):]}, not swept in this study" if locmoe else ""
    if "dense" in arms:
        d = arms["dense"]["val_bpb_vs_switch"]
        rows.append(("Switch", "A sparse top-1 MoE beats a dense model of the same active parameters",
                     f"val bpb dense − Switch {interval(d)}", setting, direction(d, lower_is_claimed=False)))
    if locmoe in arms:
        a = arms[locmoe]
        rows.append(("LocMoE", f"Locality-aware routing sends fewer tokens across nodes than Switch ({chosen})",
                     f"inter-node fraction LocMoE − Switch {interval(a['inter_node_vs_switch'])}", setting,
                     direction(a["inter_node_vs_switch"], lower_is_claimed=True)))
        rows.append(("LocMoE", "... without hurting quality (val bpb within 3% of Switch's)",
                     f"val bpb LocMoE − Switch {interval(a['val_bpb_vs_switch'])} (3% of Switch's: "
                     f"{QUALITY_MARGIN * arms['topk']['val_bpb']['mean']:.3f})", setting,
                     within(a["val_bpb_vs_switch"], QUALITY_MARGIN * arms["topk"]["val_bpb"]["mean"])))
        rows.append(("ours", "The price of locality: LocMoE drops no more choices than Switch",
                     f"dropped fraction LocMoE − Switch {interval(a['dropped_vs_switch'])}", setting,
                     direction(a["dropped_vs_switch"], lower_is_claimed=True)))
    rows.append(("LocMoE", "Locality-aware routing shortens the epoch time (12.7–22.2% on Ascend clusters)",
                 "—", "needs cluster time; `pangu-moe plan` models the exchange only (modelled, not measured)",
                 NOT_TESTABLE))
    plus = [name for name in ("locmoe_plus_hybrid", "locmoe_plus_ecr", "locmoe_plus_tcr") if name in arms]
    plus_setting = setting + (f"; LocMoE+ trained at mu = {study['mu']:g}" if study.get("mu") is not None else "")
    if "capacity_estimator" not in study:
        plus_setting += "; capacity from the quantile estimator replaced on 2026-12-07 (docs/architecture.md)"
    for name in plus[:1]:
        a, switch = arms[name], arms["topk"]
        ratio = a["capacity_ratio"]  # capacity in force over the factor-1.1 capacity, the paper's baseline
        kept = f"; kept tokens per expert {interval(a['kept_per_expert'], '{:.1f}')}" if "kept_per_expert" in a else ""
        rows.append(("LocMoE+", "At least 60% fewer tokens per expert than the capacity-factor capacity",
                     f"{name}: capacity in force / factor-1.1 capacity {interval(ratio, '{:.3f}')} "
                     f"({abs(1 - ratio['mean']):.1%} {'fewer' if ratio['mean'] <= 1 else 'more'}){kept}",
                     plus_setting, within(ratio, 0.4)))
        first, last = a["capacity_first"], a["capacity_last"]
        rows.append(("LocMoE+", "The required capacity decreases progressively during training",
                     f"{name}: capacity in force {interval(first, '{:.1f}')} at the first logged step, "
                     f"{interval(last, '{:.1f}')} at the last", plus_setting,
                     NOT_RESOLVED if not _apart(first, last) else
                     REPRODUCED if last["mean"] < first["mean"] else NOT_REPRODUCED))
        rows.append(("LocMoE+", "... at quality comparable to the baseline (val bpb within 3% of Switch's)",
                     f"val bpb {name} − Switch {interval(a['val_bpb_vs_switch'])}", plus_setting,
                     within(a["val_bpb_vs_switch"], QUALITY_MARGIN * switch["val_bpb"]["mean"])))
    if "topk_k2" in arms:
        a, switch = arms["topk_k2"], arms["topk"]
        rows.append(("Switch", "Top-1 routing keeps quality against top-2 at half the expert compute",
                     f"val bpb K=2 − K=1 {interval(a['val_bpb_vs_switch'])}; step time K=2 / K=1 "
                     f"{a['step_ms']['mean'] / switch['step_ms']['mean']:.2f}",
                     setting + " (equal steps, not equal time)",
                     non_inferior(a["val_bpb_vs_switch"], QUALITY_MARGIN * switch["val_bpb"]["mean"],
                                  higher_is_better=False, of_baseline=True)))
    return rows


def within(diff, margin):
    """A figure claimed to be at most `margin` (a difference within a margin, a ratio under a threshold):
    reproduced if its whole interval is, not reproduced if its whole interval is above, not resolved if it
    straddles `margin` or has no interval."""
    if diff["ci95"] is None:
        return NOT_RESOLVED
    if diff["mean"] + diff["ci95"] <= margin:
        return REPRODUCED
    return NOT_REPRODUCED if diff["mean"] - diff["ci95"] > margin else NOT_RESOLVED


def non_inferior(diff, margin, higher_is_better, of_baseline=False):
    """An equivalence claim on a paired difference `diff` = claimed arm - comparison (or comparison - claimed arm
    with `of_baseline`): the claimed arm is not worse than the comparison by more than `margin`. Reproduced
    only if the whole interval lies on the good side of -margin (or +margin for lower-is-better)."""
    sign = 1.0 if higher_is_better else -1.0
    if of_baseline:
        sign = -sign
    shifted = {"mean": sign * diff["mean"] + margin, "ci95": diff["ci95"], "n": diff.get("n")}
    if shifted["ci95"] is None:
        return NOT_RESOLVED
    if shifted["mean"] - shifted["ci95"] >= 0:
        return REPRODUCED
    return NOT_REPRODUCED if shifted["mean"] + shifted["ci95"] < 0 else NOT_RESOLVED


def _apart(a, b):
    """True if two {mean, ci95} intervals do not overlap (never without both intervals)."""
    if a["ci95"] is None or b["ci95"] is None:
        return False
    return abs(a["mean"] - b["mean"]) > a["ci95"] + b["ci95"]


def kool_rows(kool):
    """Claims rows from the Kool toy study (`studies.kool.run`'s result)."""
    setting = f"Kool toy task: {kool['seeds']} seeds, {kool['steps']} steps, capacity factor 1.25"
    rows = []
    pairs = {(p["regime"], p["pair"]): p for p in kool["paired"] if p["capacity_factor"] == 1.25}
    for pair, claim in (("skip - balanced", "The skip estimator routes at least as well as the balanced one"),
                        ("skip - skip_naive", "Unbiased skipping routes better than biased (unweighted) skipping")):
        for regime in ("uniform", "skewed"):
            p = pairs.get((regime, pair))
            if p:
                if pair == "skip - balanced":
                    verdict = non_inferior(p["purity"], KOOL_PURITY_MARGIN, higher_is_better=True)
                    figure = f"routing purity {pair} {interval(p['purity'])} (margin -{KOOL_PURITY_MARGIN})"
                else:
                    verdict = direction(p["purity"], lower_is_claimed=False)
                    figure = f"routing purity {pair} {interval(p['purity'])}"
                rows.append(("Kool", f"{claim} ({regime})", figure, setting, verdict))
    return rows


UNBIASED_TEST = "tests/routing/test_kool.py::test_skip_estimator_is_exactly_unbiased_and_plain_skipping_is_not"


def proof_rows(outcomes):
    """Rows shown by an exact test: `outcomes` maps a test id to "passed"/"failed" (`read_junit` of the test
    run's --junitxml); a test without a recorded outcome gives no verdict."""
    cases = [v for k, v in outcomes.items() if k == UNBIASED_TEST or k.startswith(UNBIASED_TEST + "[")]
    outcome = ("failed" if "failed" in cases else "skipped" if "skipped" in cases else
               "passed" if cases else None)  # every parametrised case must pass
    verdict = {"passed": BY_TEST, "failed": NOT_REPRODUCED}.get(outcome, NOT_RESOLVED)
    return [("Kool", "The skip estimator (Horvitz–Thompson weights) is unbiased; plain skipping is not",
             "exact expectation by enumeration against the true gradient" +
             ("" if outcome else " (no recorded test outcome)"), f"{UNBIASED_TEST}: {outcome or 'not run'}",
             verdict)]


def precision_rows(precision):
    """Claims rows from `pangu-moe bench precision --json`: each ratio needs `PRECISION_SEEDS` seeds with an
    interval, and the fp16 one fp16 runs whose loss scale both backed off and grew; a one-seed ratio is not
    resolved. A figure the bench did not measure (its runs before bf16 and the low-precision router arm) is a
    row marked not measured."""
    setting = f"bench precision: demo model, {precision.get('steps', '?')} steps"

    def ratio_of(name):
        ratio = precision.get(name)
        return ratio if isinstance(ratio, dict) or ratio is None else {"mean": ratio, "ci95": None, "n": 1}

    def seeds_missing(ratio):
        return [] if ratio["n"] >= PRECISION_SEEDS else [f"{ratio['n']} seed(s) of {PRECISION_SEEDS}"]

    fp16, bf16 = ratio_of("fp16_over_fp32_bpb"), ratio_of("bf16_over_fp32_bpb")
    scaled = precision.get("loss_scale_backoffs", 0) > 0 and precision.get("loss_scale_growths", 0) > 0
    missing = seeds_missing(fp16) + ([] if scaled else ["no fp16 run whose loss scale both backed off and grew"])
    rows = [("Switch", "Selective precision (low-precision compute, fp32 router) trains as well as fp32",
             f"val bpb fp16 / fp32 = {interval(fp16, '{:.3f}')}" + (f" ({'; '.join(missing)})" if missing else ""),
             setting, within(fp16, 1.02) if not missing else NOT_RESOLVED)]
    if bf16 is None:
        rows.append(("ours", "bf16 (operands rounded to bf16, fp32 accumulation) trains as well as fp32",
                     "not measured", setting, NOT_RESOLVED))
    else:
        missing = seeds_missing(bf16)
        rows.append(("ours", "bf16 (operands rounded to bf16, fp32 accumulation) trains as well as fp32",
                     f"val bpb bf16 / fp32 = {interval(bf16, '{:.3f}')}" + (f" ({missing[0]})" if missing else ""),
                     setting + " (bf16 in its CPU form)", within(bf16, 1.02) if not missing else NOT_RESOLVED))
    router = precision.get("fp16_router_low_minus_fp16_bpb")
    rows.append(("Switch", "A router in the low precision trains worse than one kept in fp32",
                 "not measured" if router is None else f"val bpb, router fp16 - router fp32 (fp16 compute) "
                                                       f"{interval(router)}",
                 setting, NOT_RESOLVED if router is None else direction(router, lower_is_claimed=False)))
    return rows


CLAIM_STUDY_PAPERS = {"capacity": "LocMoE+", "estimator": "LocMoE+", "locality-null": "LocMoE", "locality": "LocMoE"}


def claim_study_rows(result):
    """Rows of a claim study (`studies.presets.run`'s result): its verdicts as the preset computed them."""
    data = "domains by node" if result["study"] == "locality" else "iid data"
    setting = (f"{result['study']} study: {result['steps']} steps x {result['seeds']} seeds, demo model, 2 nodes x "
               f"2 devices, E = 8, {data}, no z-loss (pangu_moe/studies/presets.py)")
    return [(CLAIM_STUDY_PAPERS.get(result["study"], "ours"), v["claim"], v["figure"], setting, v["verdict"])
            for v in result["verdicts"]]


def read_junit(path):
    """{test id (path::name): "passed" | "failed" | "skipped"} from a pytest --junitxml file."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ConfigError(f"--tests {path}: not a pytest --junitxml file ({e})") from None
    outcomes = {}
    for case in root.iter("testcase"):
        test_id = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        kinds = {child.tag for child in case}
        outcomes[test_id] = ("failed" if kinds & {"failure", "error"} else
                             "skipped" if "skipped" in kinds else "passed")
    return outcomes


def render(rows, sources):
    """The markdown page: the rows, then where each input came from."""
    lines = ["# Claims table", "", "Generated by `pangu-moe claims` (`pangu_moe/studies/claims.py` states the verdict "
             "rules); do not edit by hand.", "", "| paper | claim | our figure (95% interval) | setting | verdict |",
             "|---|---|---|---|---|"]
    lines += [f"| {paper} | {claim} | {figure} | {setting} | {verdict} |" for paper, claim, figure, setting, verdict
              in rows]
    lines += ["", "Inputs:", ""] + [f"- {name}: {source}" for name, source in sources.items()]
    return "\n".join(lines) + "\n"


def _claim_key(row):
    """(paper, claim without its parenthesised setting): the same claim measured by different studies."""
    return row[0], row[1].split(" (")[0]


def merged_router_rows(studies):
    """Router-study rows from several studies (e.g. the full study and a wider dense-vs-Switch one): each claim
    from the study with the most seeds that measured it, in the order of the study with the most claims."""
    per_study = [router_rows(study) for study in studies]
    best = {}
    for study, rows in zip(studies, per_study):
        for row in rows:
            key = _claim_key(row)
            if key not in best or study["seeds"] > best[key][0]:
                best[key] = (study["seeds"], row)
    order = [_claim_key(row) for rows in sorted(per_study, key=len, reverse=True) for row in rows]
    return [best[key][1] for key in dict.fromkeys(order)]


def write(out, study_paths, kool_path=None, precision_path=None, tests_path=None, claim_study_paths=()):
    """Read the inputs (JSON files; a study folder's study.json; `study_paths` one or more router studies, see
    `merged_router_rows`; `tests_path` a pytest --junitxml file; `claim_study_paths` the claim studies'
    study.json), write the page to `out`; returns its rows."""
    if isinstance(study_paths, str):
        raise TypeError("study_paths: a list of paths")

    def load(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    rows = merged_router_rows([load(path) for path in study_paths])
    sources = {"router study": ", ".join(study_paths)}
    for path in claim_study_paths:
        rows += claim_study_rows(load(path))
    if claim_study_paths:
        sources["claim studies"] = ", ".join(claim_study_paths)
    rows += proof_rows(read_junit(tests_path) if tests_path else {})
    sources["test outcomes"] = tests_path or (f"not given (`python -m pytest {UNBIASED_TEST} --junitxml "
                                              f"tests.xml`, then `--tests tests.xml`)")
    if kool_path:
        rows += kool_rows(load(kool_path))
        sources["Kool study"] = kool_path
    else:
        sources["Kool study"] = "not given (`pangu-moe study kool --json > kool.json`, then `--kool kool.json`)"
    if precision_path:
        rows += precision_rows(load(precision_path))
        sources["precision bench"] = precision_path
    else:
        sources["precision bench"] = "not given (`pangu-moe bench precision --json > precision.json`)"
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(render(rows, sources))
    return rows
