"""runtime.profile_steps: MindSpore's profiler around chosen training steps, its op table read back."""
import subprocess
import sys

import pytest

from pangu_moe.config import ConfigError
from pangu_moe.train.profile import op_type_times
from tests.conftest import tiny_config


def test_profiled_steps_write_op_times_under_the_run_dir_and_keep_stdout_clean(tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny_config("train.steps=5", "train.eval_every=5", "train.checkpoint_every=5").save(str(config))
    done = subprocess.run([sys.executable, "-m", "pangu_moe.cli", "train", "--config", str(config), "--out", "run",
                           "--set", "runtime.profile_steps=[2, 4]"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "summary: run/summary.json\n"  # the profiler's progress lines went to stderr
    assert "profiled steps 2..3 into run/profile; top ops: " in done.stderr
    times = op_type_times(str(tmp_path / "run" / "profile"))
    assert {"MatMul", "BatchMatMul"} & {op for op, _, _ in times} and all(ms > 0 for _, ms, _ in times)
    assert [ms for _, ms, _ in times] == sorted((ms for _, ms, _ in times), reverse=True)
    assert sum(share for _, _, share in times) == pytest.approx(1.0, abs=0.01)
    assert op_type_times(str(tmp_path / "nothing")) == []


@pytest.mark.parametrize("steps", ["[3]", "[4, 4]", "[2, 9]", "[-1, 2]"])
def test_profile_steps_out_of_range_are_refused(steps):
    with pytest.raises(ConfigError, match=r"runtime.profile_steps = .*: must be \[\] or \[start, end\] with 0 <= start "
                                          r"< end <= train.steps=5"):
        tiny_config("train.steps=5", "train.eval_every=5", "train.checkpoint_every=5", f"runtime.profile_steps={steps}")
