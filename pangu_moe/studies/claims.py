"""`pangu-moe claims`: the claims table, docs/results/claims.md, from the studies' outputs.

One row per testable claim of LocMoE, LocMoE+, Kool et al. and Switch: the claim, our figure with its 95%
interval, the setting it was measured in, and a verdict computed from that figure:

- reproduced: the interval lies on the claim's side (a paired difference to Switch that excludes 0 in the
  claimed direction; a ratio past the claimed threshold);
- not reproduced: the interval lies on the other side, or the figure misses the claimed threshold;
- not resolved: the interval straddles 0 at this number of seeds (a larger study could still decide);
- not testable at this scale: the claim needs what a 2-core CPU cannot give (cluster time), with why.

Inputs: one or more router studies' `study.json` (`studies.routers`; each claim from the study with the most
seeds that measured it), optionally the Kool study's JSON
(`pangu-moe study kool --json`) and `pangu-moe bench precision --json`. Rows whose input is missing say
which command produces it. Nothing here is typed in by hand: rerun the command after rerunning a study.
"""
import json

from pangu_moe.studies.stats import resolved

REPRODUCED, NOT_REPRODUCED, NOT_RESOLVED, NOT_TESTABLE = ("reproduced", "not reproduced", "not resolved",
                                                           "not testable at this scale")


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
                     f"{0.03 * arms['topk']['val_bpb']['mean']:.3f})", setting, _within(a["val_bpb_vs_switch"],
                                                                                     0.03 * arms["topk"]["val_bpb"]["mean"])))
        rows.append(("ours", "The price of locality: LocMoE drops no more choices than Switch",
                     f"dropped fraction LocMoE − Switch {interval(a['dropped_vs_switch'])}", setting,
                     direction(a["dropped_vs_switch"], lower_is_claimed=True)))
    rows.append(("LocMoE", "Locality-aware routing shortens the epoch time (12.7–22.2% on Ascend clusters)",
                 "—", "needs cluster time; `pangu-moe plan` models the exchange only (modelled, not measured)",
                 NOT_TESTABLE))
    plus = [name for name in ("locmoe_plus_hybrid", "locmoe_plus_ecr", "locmoe_plus_tcr") if name in arms]
    plus_setting = setting + (f"; LocMoE+ trained at mu = {study['mu']:g}" if study.get("mu") is not None else "")
    for name in plus[:1]:
        a, switch = arms[name], arms["topk"]
        fewer = 1 - a["capacity_ratio"]["mean"] / switch["capacity_ratio"]["mean"]
        rows.append(("LocMoE+", "At least 60% fewer tokens per expert than the capacity-factor capacity",
                     f"{name}: {fewer:.1%} fewer slots in force than Switch's (capacity ratio "
                     f"{interval(a['capacity_ratio'], '{:.3f}')} vs {interval(switch['capacity_ratio'], '{:.3f}')})",
                     plus_setting, REPRODUCED if fewer >= 0.6 else NOT_REPRODUCED))
        first, last = a["capacity_first"], a["capacity_last"]
        rows.append(("LocMoE+", "The required capacity decreases progressively during training",
                     f"{name}: capacity in force {interval(first, '{:.1f}')} at the first logged step, "
                     f"{interval(last, '{:.1f}')} at the last", plus_setting,
                     REPRODUCED if last["mean"] < first["mean"] and _apart(first, last) else
                     NOT_RESOLVED if not _apart(first, last) else NOT_REPRODUCED))
        rows.append(("LocMoE+", "... at quality comparable to the baseline (val bpb within 3% of Switch's)",
                     f"val bpb {name} − Switch {interval(a['val_bpb_vs_switch'])}", plus_setting,
                     _within(a["val_bpb_vs_switch"], 0.03 * switch["val_bpb"]["mean"])))
    if "topk_k2" in arms:
        a, switch = arms["topk_k2"], arms["topk"]
        rows.append(("Switch", "Top-1 routing keeps quality against top-2 at half the expert compute",
                     f"val bpb K=2 − K=1 {interval(a['val_bpb_vs_switch'])}; step time K=2 / K=1 "
                     f"{a['step_ms']['mean'] / switch['step_ms']['mean']:.2f}",
                     setting + " (equal steps, not equal time)",
                     REPRODUCED if not resolved(a["val_bpb_vs_switch"]) or a["val_bpb_vs_switch"]["mean"] > 0
                     else NOT_REPRODUCED))
    return rows


def _within(diff, margin):
    """Reproduced if the whole interval of `diff` lies below `margin`; not reproduced if it lies above."""
    half = diff["ci95"] or 0.0
    if diff["mean"] + half <= margin:
        return REPRODUCED
    return NOT_REPRODUCED if diff["mean"] - half > margin else NOT_RESOLVED


def _apart(a, b):
    """True if two {mean, ci95} intervals do not overlap."""
    return abs(a["mean"] - b["mean"]) > (a["ci95"] or 0.0) + (b["ci95"] or 0.0)


def kool_rows(kool):
    """Claims rows from the Kool toy study (`studies.kool.run`'s result)."""
    setting = f"Kool toy task: {kool['seeds']} seeds, {kool['steps']} steps, capacity factor 1.25"
    rows = [("Kool", "The skip estimator (Horvitz–Thompson weights) is unbiased; plain skipping is not",
             "exact expectation by enumeration equals the true gradient",
             "tests/routing/test_kool.py::test_skip_estimator_is_exactly_unbiased_and_plain_skipping_is_not",
             REPRODUCED)]
    pairs = {(p["regime"], p["pair"]): p for p in kool["paired"] if p["capacity_factor"] == 1.25}
    for pair, claim in (("skip - balanced", "The skip estimator routes at least as well as the balanced one"),
                        ("skip - skip_naive", "Unbiased skipping routes better than biased (unweighted) skipping")):
        for regime in ("uniform", "skewed"):
            p = pairs.get((regime, pair))
            if p:
                verdict = direction(p["purity"], lower_is_claimed=False)
                if pair == "skip - balanced" and verdict == NOT_RESOLVED:
                    verdict = REPRODUCED + " (no difference resolved; the claim is >=)"
                rows.append(("Kool", f"{claim} ({regime})", f"routing purity {pair} {interval(p['purity'])}",
                             setting, verdict))
    return rows


def precision_rows(precision):
    """Claims rows from `pangu-moe bench precision --json`."""
    ratio = precision["fp16_over_fp32_bpb"]
    return [("Switch", "Selective precision (low-precision compute, fp32 router) trains as well as fp32",
             f"val bpb fp16 / fp32 = {ratio:.3f} (one seed each)",
             f"bench precision: demo model, {precision.get('steps', '?')} steps",
             REPRODUCED if ratio <= 1.02 else NOT_REPRODUCED)]


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


def write(out, study_paths, kool_path=None, precision_path=None):
    """Read the inputs (JSON files; a study folder's study.json; `study_paths` one or more router studies, see
    `merged_router_rows`), write the page to `out`; returns its rows."""
    if isinstance(study_paths, str):
        raise TypeError("study_paths: a list of paths")

    def load(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    rows = merged_router_rows([load(path) for path in study_paths])
    sources = {"router study": ", ".join(study_paths)}
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
