"""`pangu-moe doctor` reports the environment it is given and derives the usable backends from it."""
import json

from pangu_moe import doctor
from pangu_moe.cli import main


def test_findings_follow_the_environment(tmp_path):
    vendor = tmp_path / "opp" / "vendors" / "pangu_moe"
    vendor.mkdir(parents=True)
    environ = {"ASCEND_CUSTOM_OPP_PATH": f"/nowhere:{vendor}", "HCCL_EXEC_TIMEOUT": "99"}
    found = doctor.findings(environ, which=lambda name: None, python="/nowhere/bin/python")
    assert found["devices"]["CPU"]
    assert found["cann"]["ASCEND_CUSTOM_OPP_PATH"] == f"/nowhere:{vendor}" and found["cann"]["ASCEND_HOME_PATH"] is None
    assert found["hccl"]["HCCL_EXEC_TIMEOUT"] == "99" and found["hccl"]["RANK_TABLE_FILE"] is None
    assert found["ascend_kernels"] == f"installed: {vendor}" and found["compiler"] is None and found["msrun"] is None
    assert found["dispatch_backends"] == ["local", "simulated"]  # no msrun: no multi-process backend
    with_msrun = doctor.findings(environ, which=lambda name: f"/usr/bin/{name}", python="/nowhere/bin/python")
    assert with_msrun["dispatch_backends"][:3] == ["local", "simulated", "msrun_cpu"]
    # a compiler builds the CPU kernels; no Ascend device, so no ascend_builtin
    assert with_msrun["kernel_backends"] == ["reference", "custom", "auto"]
    assert found["shipped_moe_ops"] == "signatures match ops/shipped.py"
    lines = doctor.text(found).splitlines()
    assert "hccl         HCCL_EXEC_TIMEOUT=99" in lines and "cann         ASCEND_HOME_PATH=not set" in lines
    assert lines[-1].startswith("usable here  parallel.dispatch: local, simulated")


def test_cli_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["kernel_backends"][0] == "reference" and set(found["devices"]) == {"CPU", "Ascend", "GPU"}
