"""metrics.jsonl records and the exact per-layer token accounting they carry."""
import json
import os


def layer_records(tokens_per_expert, kept_per_expert, capacity):
    """Per-MoE-layer accounting for one step (single device: every kept token is local).

    Args:
        tokens_per_expert, kept_per_expert: [L, E] int arrays (demand before dropping, kept).
        capacity: C of the step.
    Returns:
        list of L dicts with tokens_per_expert, kept_per_expert, dropped, capacity, tokens_local,
        tokens_intra, tokens_inter, bytes_intra, bytes_inter.
    """
    out = []
    for demand, kept in zip(tokens_per_expert, kept_per_expert):
        out.append({
            "tokens_per_expert": [int(v) for v in demand],
            "kept_per_expert": [int(v) for v in kept],
            "dropped": int(demand.sum() - kept.sum()),
            "capacity": int(capacity),
            "tokens_local": int(kept.sum()),
            "tokens_intra": 0,
            "tokens_inter": 0,
            "bytes_intra": 0,
            "bytes_inter": 0,
        })
    return out


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl."""

    def __init__(self, path, keep_until_step=None):
        """Open for appending; with `keep_until_step`, first drop records of later steps (resume)."""
        self.path = path
        if keep_until_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= keep_until_step]
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
        elif keep_until_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read(path):
    """All records of a metrics.jsonl."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
