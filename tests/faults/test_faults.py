"""The fault-injection driver in CI's size: 2 SIGKILL-and-resume cycles of a tiny run, and every
malformed config and corpus of the fuzz (the note reports a larger run of `python -m tests.faults.driver`)."""
from tests.faults import driver


def test_kills_resume_identically_and_bad_inputs_get_one_line_errors(tmp_path):
    lines = []
    result = driver.run(kills=2, steps=12, seed=1, out=str(tmp_path), log=lines.append)
    print(driver.summary_line(result))
    assert result["survived"] == 2 and result["identical"], lines
    assert result["lost"] == 0 and result["tracebacks"] == 0
    assert result["bad_inputs"] >= 50 + 20 and result["misreported"] == 0, lines
