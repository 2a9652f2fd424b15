"""`pangu-moe doctor`: what this machine offers a pangu_moe run, found without running anything heavy.

MindSpore's version and the device targets it can use, the CANN toolkit and HCCL settings in the environment,
msrun and a C++ compiler on PATH, whether the CPU and Ascend C kernels are built, and from these the dispatch
backends and kernel backends a run can use here (`parallel.dispatch`, `runtime.kernels`).
"""
import glob
import os
import platform
import shutil
import sys

CANN_VARIABLES = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH", "ASCEND_CUSTOM_OPP_PATH")
HCCL_VARIABLES = ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE", "RANK_TABLE_FILE",
                  "ASCEND_RT_VISIBLE_DEVICES", "ASCEND_PROCESS_LOG_PATH")
DEVICES = ("CPU", "Ascend", "GPU")


def findings(environ=None, which=shutil.which, python=sys.executable):
    """{python, platform, mindspore, devices: {target: bool}, cann: {variable: value or None}, npu_smi,
    hccl: {variable: value or None}, msrun, compiler, cpu_kernels, ascend_kernels, shipped_moe_ops (the installed
    MindSpore's MoE op signatures against `ops.shipped`), dispatch_backends, kernel_backends}. `environ` (default
    os.environ), `which` and `python` (msrun is looked for beside it, as the launch scripts do) are parameters so
    tests can describe a machine."""
    import mindspore as ms
    from mindspore import hal
    from pangu_moe.ops import build
    from pangu_moe.ops.shipped import check_signatures
    environ = os.environ if environ is None else environ
    devices = {}
    for target in DEVICES:
        try:
            devices[target] = bool(hal.is_available(target))
        except (RuntimeError, ValueError):
            devices[target] = False
    msrun = os.path.join(os.path.dirname(python), "msrun")
    msrun = msrun if os.path.isfile(msrun) else which("msrun")
    compiler = which("g++") or which("c++")
    cpu_library = build.built_library()
    signature_problems = check_signatures()
    ascend_packages = sorted(glob.glob(str(build.KERNELS_DIR / "ascend" / "build_out" / "*.run")))
    vendor = [path for path in environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":")
              if path.rstrip("/").endswith("vendors/pangu_moe") and os.path.isdir(path)]
    dispatch = ["local", "simulated"] + (["msrun_cpu"] if msrun else []) + \
        (["hccl"] if msrun and devices["Ascend"] else [])
    kernels = ["reference"] + (["custom"] if (cpu_library or compiler) or (devices["Ascend"] and vendor) else []) + \
        (["ascend_builtin"] if devices["Ascend"] and not signature_problems else []) + ["auto"]
    return {
        "python": f"{platform.python_version()} ({sys.executable})", "platform": f"{platform.machine()}, "
        f"{os.cpu_count()} cores", "mindspore": ms.__version__, "devices": devices,
        "cann": {name: environ.get(name) for name in CANN_VARIABLES}, "npu_smi": which("npu-smi"),
        "hccl": {name: environ.get(name) for name in HCCL_VARIABLES}, "msrun": msrun, "compiler": compiler,
        "cpu_kernels": cpu_library or ("not built; built on first use with " + compiler if compiler else
                                       "not built; no C++ compiler to build them"),
        "ascend_kernels": ("installed: " + ", ".join(vendor)) if vendor else
        ("built, not installed: " + ", ".join(ascend_packages)) if ascend_packages else
        "not built (kernels/ascend/build.sh, on an Ascend host with CANN)",
        "shipped_moe_ops": "; ".join(signature_problems) or "signatures match ops/shipped.py",
        "dispatch_backends": dispatch, "kernel_backends": kernels}


def text(found):
    """Human-readable lines of `findings`."""
    def unset(value):
        return value if value else "not set"
    lines = [f"python       {found['python']}", f"platform     {found['platform']}",
             f"mindspore    {found['mindspore']}; devices: " +
             ", ".join(f"{d} {'yes' if ok else 'no'}" for d, ok in found["devices"].items())]
    lines += [f"cann         {name}={unset(value)}" for name, value in found["cann"].items()]
    lines += [f"cann         npu-smi: {found['npu_smi'] or 'not on PATH'}"]
    lines += [f"hccl         {name}={unset(value)}" for name, value in found["hccl"].items()]
    lines += [f"msrun        {found['msrun'] or 'not found (multi-process backends need it)'}",
              f"compiler     {found['compiler'] or 'none (runtime.kernels: custom needs g++ on CPU)'}",
              f"cpu kernels  {found['cpu_kernels']}", f"ascend       {found['ascend_kernels']}",
              f"shipped ops  {found['shipped_moe_ops']} (runtime.kernels: ascend_builtin)",
              f"usable here  parallel.dispatch: {', '.join(found['dispatch_backends'])}; runtime.kernels: "
              f"{', '.join(found['kernel_backends'])}"]
    return "\n".join(lines)
