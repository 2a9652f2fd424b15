"""metrics.jsonl: one JSON record per logged step (per-layer accounting: `dispatch.accounting`)."""
import json
import os


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
