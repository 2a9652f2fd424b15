"""`pangu-moe doctor` reports the environment it is given and derives the usable backends from it."""
import json

from pangu_moe import doctor
from pangu_moe.cli import main


def test_findings_follow_the_environment(tmp_path):
    vendor = tmp_path / "opp" / "vendors" / "pangu_moe"
    vendor.mkdir(parents=True)
    environ = {"ASCEND_CUSTOM_OPP_PATH": f"/nowhere:{vendor}", "HCCL_EXEC_TIMEOUT": "99"}
    found = doctor.findings(environ, which=lambda name: None)
    assert found["devices"]["CPU"] and not found["devices"]["Ascend"]  # this machine: no NPU
    assert found["cann"]["ASCEND_CUSTOM_OPP_PATH"] == f"/nowhere:{vendor}" and found["cann"]["ASCEND_HOME_PATH"] is None
    assert found["hccl"]["HCCL_EXEC_TIMEOUT"] == "99" and found["hccl"]["RANK_TABLE_FILE"] is None
    assert found["ascend_kernels"] == f"installed: {vendor}" and found["compiler"] is None
    assert found["dispatch_backends"][:2] == ["local", "simulated"] and "hccl" not in found["dispatch_backends"]
    lines = doctor.text(found).splitlines()
    assert "hccl         HCCL_EXEC_TIMEOUT=99" in lines and "cann         ASCEND_HOME_PATH=not set" in lines
    assert lines[-1].startswith("usable here  parallel.dispatch: local, simulated")


def test_cli_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["kernel_backends"][0] == "reference" and set(found["devices"]) == {"CPU", "Ascend", "GPU"}
