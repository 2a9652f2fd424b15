"""metrics.jsonl: one JSON record per logged step (per-layer accounting: `accounting.traffic`)."""
import json
import math
import os


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl."""

    def __init__(self, path, keep_until_step=None):
        """Open for appending; with `keep_until_step`, first drop records of later steps and a partial last
        line (a run killed while writing it) (resume)."""
        self.path = path
        if keep_until_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                kept = [line for line, step in ((line, _step(line)) for line in fh)
                        if step is not None and step <= keep_until_step]
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
        elif keep_until_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record):
        """Append `record`; non-finite floats (a skipped step's loss) are written as null (JSON has no NaN)."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _step(line):
    """The step of a complete record line, or None for a blank or partial one."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


def read(path):
    """All records of a metrics.jsonl."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
