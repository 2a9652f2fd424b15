"""metrics.jsonl: one JSON record per logged step (per-layer accounting: `accounting.traffic`), and the same
records' scalars as TensorBoard events when the optional `tensorboardX` is installed."""
import json
import math
import os

from pangu_moe.report import runs as run_data

TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard: `tensorboard --logdir RUN_DIR/tensorboard`


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

    def close(self):
        """Nothing is held open: each record is appended and the file closed, so a kill loses at most one line."""


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


def tensorboard_scalars(record):
    """{tag: value} of one metrics record, in bits where a loss has units: the LM loss in bits per token, validation
    in bits per byte, the auxiliary losses as they are, lr, throughput, gradient norm, dropped and inter-node
    fractions over the MoE layers, and each layer's capacity and max/mean expert load. Non-finite values are left
    out (a skipped step)."""
    scalars = {"loss/lm_bits_per_token": record["lm_loss"] / math.log(2),
               **{f"loss/{name}": record[name] for name in ("aux_loss", "z_loss", "locality_loss") if name in record},
               "train/lr": record["lr"], "train/tokens_per_s": record["tokens_per_s"],
               "train/grad_norm": record["grad_norm"]}
    if "val_bpb" in record:
        scalars["val/bits_per_byte"] = record["val_bpb"]
    layers = record.get("layers", [])
    if layers:  # the report's own series, so the browser and the report show one number
        scalars["routing/dropped_fraction"] = run_data.dropped_fraction([record])[0]
        scalars["routing/inter_node_fraction"] = run_data.inter_node_fraction([record])[0]
    for i, layer in enumerate(layers):
        scalars[f"routing/capacity/layer{i}"] = layer["capacity"]
        scalars[f"routing/max_over_mean_load/layer{i}"] = layer["max_over_mean_load"]
    return {tag: float(v) for tag, v in scalars.items() if v is not None and math.isfinite(v)}


class TensorBoardLog:
    """`tensorboard_scalars` of each record as events in RUN_DIR/tensorboard. `open` returns None when tensorboardX
    is not installed (the `tensorboard` extra): training then writes metrics.jsonl only, as without this class."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_dir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
        return cls(SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR)))

    def write(self, record):
        for tag, value in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a browser watching the run sees each record as it is logged

    def close(self):
        self.writer.close()
