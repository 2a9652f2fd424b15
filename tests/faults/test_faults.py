"""The fault-injection driver in CI's size: 2 SIGKILL-and-resume cycles of a tiny run, and every
malformed config and corpus of the fuzz (the note reports a larger run of `python -m tests.faults.driver`)."""
import pytest
import yaml

from tests.faults import driver


def test_kills_resume_identically_and_bad_inputs_get_one_line_errors(tmp_path):
    lines = []
    result = driver.run(kills=2, steps=12, seed=1, out=str(tmp_path), log=lines.append)
    print(driver.summary_line(result))
    assert result["survived"] == 2 and result["identical"], lines
    assert result["lost"] == 0 and result["tracebacks"] == 0
    assert result["bad_inputs"] >= 50 + 20 and result["misreported"] == 0, lines


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("locmoe", 1), ("locmoe", 2)])
def test_a_killed_run_resumes_identically_for_each_router_and_k(tmp_path, router, top_k):
    """The fp32 gating softmax on CPU, as on Ascend (the first test covers topk with K = 1): the resumed run's
    every logged loss, gradient norm and routing count equal the uninterrupted run's."""
    lines = []
    result = driver.run(kills=2, steps=12, seed=1, out=str(tmp_path), log=lines.append,
                        sets=[f"moe.router={router}", f"moe.top_k={top_k}"], fuzzing=False)
    assert result["survived"] == 2 and result["identical"] and result["lost"] == 0, lines
    moe = yaml.safe_load((tmp_path / "victim" / "config.yaml").read_text())["moe"]
    assert (moe["router"], moe["top_k"]) == (router, top_k)
