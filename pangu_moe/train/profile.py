"""`runtime.profile_steps: [start, end]`: MindSpore's profiler around training steps start..end-1 (0-based, so
`[10, 20]` profiles the 10 steps after the first 10), its output under RUN_DIR/profile.

On CPU MindSpore writes per-op tables (`FRAMEWORK/cpu_op_type_info_<rank>.csv`: time per op type over the
profiled steps), which `op_type_times` reads; on Ascend it writes its own ASCEND_PROFILER_OUTPUT tables and a
trace for MindStudio Insight (not read here; unverified: no Ascend device).
"""
import contextlib
import csv
import glob
import os
import sys

PROFILE_DIR = "profile"


class StepProfiler:
    """Args: steps: [start, end] (empty: off); run_dir: where PROFILE_DIR goes; log: callable taking a line."""

    def __init__(self, steps, run_dir, log):
        self.start, self.end = steps if steps else (None, None)
        self.out, self.log, self.profiler, self.redirect = os.path.join(run_dir, PROFILE_DIR), log, None, None

    def before_step(self, step):
        """Call before training step `step` (0-based)."""
        if step == self.start:
            from mindspore import Profiler
            # The profiler's helper processes print progress; stdout is for results (`pangu-moe train` prints the
            # summary path there), so their inherited stdout is stderr.
            self.redirect = _stdout_to_stderr()
            self.redirect.__enter__()
            self.profiler = Profiler(output_path=self.out, start_profile=False)
            self.profiler.start()

    def after_step(self, step):
        """Call after training step `step` (0-based) has finished."""
        if self.profiler is not None and step + 1 == self.end:
            self.close()
            times = op_type_times(self.out)
            top = ", ".join(f"{op} {ms:.1f} ms ({share:.0%})" for op, ms, share in times[:5])
            self.log(f"profiled steps {self.start}..{self.end - 1} into {self.out}" + (f"; top ops: {top}" if top else ""))


    def close(self):
        """Stop and analyse a profiler still running (the run ended inside the window) and give stdout back."""
        if self.profiler is not None:
            try:
                self.profiler.stop()
                self.profiler.analyse()
            finally:
                self.redirect.__exit__(None, None, None)
                self.profiler = self.redirect = None


def op_type_times(out):
    """[(op type, total ms over the profiled steps, share of the total)] from the newest CPU op-type table under
    `out`, largest first; [] if there is none (Ascend, or nothing profiled)."""
    tables = sorted(glob.glob(os.path.join(out, "*", "FRAMEWORK", "cpu_op_type_info_*.csv")), key=os.path.getmtime)
    if not tables:
        return []
    with open(tables[-1], encoding="utf-8") as fh:
        rows = [(r["op_type"], float(r["total_compute_time"]), float(r["percent"])) for r in csv.DictReader(fh)]
    return sorted(rows, key=lambda row: -row[1])


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr (child processes included) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
