"""The report's summary table: one row per run, every number taken from summary.json or metrics.jsonl.

A finished run's row comes from its summary.json (whole-run token counts, final evaluation over all
validation batches). A run without one (still training, or killed) gets what its metrics.jsonl
supports: counts over its logged steps and its last periodic evaluation; `source` says which.
"""
import math

from pangu_moe.report import runs as run_data

# (key, header, format) in table order; None values print as "-".
COLUMNS = (
    ("run", "run", "{}"), ("router", "router", "{}"), ("steps", "steps", "{:d}"),
    ("final_lm_bits", "final LM bits/token", "{:.4f}"), ("val_bpb", "val bpb", "{:.3f}"),
    ("bpb_over_unigram", "bpb / unigram", "{:.3f}"), ("dropped_fraction", "dropped", "{:.2%}"),
    ("inter_node_fraction", "inter-node", "{:.3f}"), ("max_over_mean_load", "max/mean load", "{:.2f}"),
    ("dead_experts", "dead experts", "{:d}"), ("capacity", "capacity", "{}"),
    ("capacity_ratio", "capacity ratio", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
)
SUMMARY_FIELDS = ("val_bpb", "bpb_over_unigram", "dropped_fraction", "inter_node_fraction", "max_over_mean_load",
                  "dead_experts", "capacity", "capacity_ratio", "tokens_per_s")


def _router(run):
    if run.config is None:
        return run.summary.get("router") if run.summary else None
    moe = run.config.moe
    return f"{moe.router} K={moe.top_k}"


def summary_row(run):
    """{column key: value} for one `runs.Run`, plus "source": "summary.json" or "metrics.jsonl"."""
    records = run.records
    lm_loss = records[-1]["lm_loss"]  # nats; None for a skipped (non-finite) step
    row = {"run": run.name, "router": _router(run), "steps": int(records[-1]["step"]),
           "final_lm_bits": None if lm_loss is None else lm_loss / math.log(2)}
    if run.summary is not None:
        row.update({key: run.summary.get(key) for key in SUMMARY_FIELDS})
        row["steps"] = int(run.summary.get("steps", row["steps"]))
        row["source"] = run_data.SUMMARY
        return row
    _, val = run_data.curve(records, "val_bpb")
    totals = {name: float(counts.sum()) for name, counts in run_data.layer_counts(records).items()}  # logged steps
    capacities = run_data.capacities(records)
    row.update({key: None for key in SUMMARY_FIELDS})
    row.update(val_bpb=float(val[-1]) if len(val) else None,
               dropped_fraction=totals["dropped"] / totals["requested"] if totals["requested"] else None,
               inter_node_fraction=totals["inter"] / totals["kept"] if totals["kept"] else None,
               capacity=int(capacities[-1].max()) if len(capacities) else None,
               source=run_data.METRICS)
    return row


def _cell(value, fmt):
    return "-" if value is None else fmt.format(value)


def markdown(rows):
    """A markdown table of `summary_row` dicts."""
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)
