"""kernels/ascend/build.sh, the parts that run without CANN: staging every op's sources for MindSpore's
custom_compiler (flat folders, the shared header beside them, its includes rewritten) and the error without CANN."""
import os
import subprocess

import pytest

from pangu_moe.ops.build import KERNELS_DIR

ASCEND = KERNELS_DIR / "ascend"
BUILD = ASCEND / "build.sh"
OPS = ("moe_gating", "moe_gating_grad", "moe_dispatch_layout", "moe_permute", "moe_unpermute", "moe_unpermute_grad")


def test_staging_copies_every_op_file_with_the_shared_header_included_from_its_own_folder(tmp_path):
    done = subprocess.run(["bash", str(BUILD), "--stage-only", str(tmp_path / "stage")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for part in ("op_host", "op_kernel"):
        sources = {p.name: p for op in OPS for p in (ASCEND / op / part).iterdir() if p.suffix in (".cpp", ".h")}
        staged = {p.name for p in (tmp_path / "stage" / part).iterdir()}
        assert staged == set(sources) | {"moe_kernel_common.h"}, part
        for name, source in sources.items():
            text = (tmp_path / "stage" / part / name).read_text()
            assert "../" not in "".join(line for line in text.splitlines() if line.startswith("#include"))
            if "common/moe_kernel_common.h" in source.read_text():
                assert '#include "moe_kernel_common.h"' in text
            # nothing but the include line changed
            assert len(text.splitlines()) == len(source.read_text().splitlines())
        header = (tmp_path / "stage" / part / "moe_kernel_common.h").read_bytes()
        assert header == (KERNELS_DIR / "common" / "moe_kernel_common.h").read_bytes()


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/usr/local/Ascend/ascend-toolkit/set_env.sh",
                                                    "/usr/local/Ascend/cann/set_env.sh")),
                    reason="a CANN install is here; build.sh would find it")
def test_without_cann_the_build_stops_with_what_to_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ASCEND_HOME_PATH"}
    env["ASCEND_SET_ENV"] = str(tmp_path / "no_set_env.sh")
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and not (ASCEND / "build_out").exists()
    assert done.stderr.startswith("build.sh: error: CANN not found: ASCEND_HOME_PATH is unset and no set_env.sh")
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in done.stderr
