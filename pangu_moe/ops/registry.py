"""The kernel registry: (op, backend) -> the cell implementing it.

`reference` is plain MindSpore and the specification; `cpu` and `ascend_c` are the custom kernels (our C++ and
Ascend C; `ascend_c` is named apart from `ascend_builtin`, MindSpore's shipped MoE ops).
`runtime.kernels` picks reference, custom, ascend_builtin or auto, and the device picks which custom backend
(`kernel_backend`); nothing reads the environment. `ascend_builtin` replaces the whole dispatch, not single ops
(`ops.shipped.CompactDispatcher`), so it has no entries here.
"""
from functools import partial

from pangu_moe.config import KERNELS
from pangu_moe.ops.gating import CustomGating, ReferenceGating
from pangu_moe.ops.layout import CustomLayout, ReferenceLayout
from pangu_moe.ops.permute import CustomPermute, CustomUnpermute, ReferencePermute, ReferenceUnpermute
from pangu_moe.ops.shipped import unfit

KERNEL_BACKENDS = ("reference", "cpu", "ascend_c", "ascend_builtin")  # ascend_builtin: ops.shipped, not OPS
OPS = {}
for _backend in ("cpu", "ascend_c"):
    OPS["moe_gating", _backend] = partial(CustomGating, backend=_backend)
    OPS["moe_dispatch_layout", _backend] = partial(CustomLayout, backend=_backend)
    OPS["moe_permute", _backend] = partial(CustomPermute, backend=_backend)
    OPS["moe_unpermute", _backend] = partial(CustomUnpermute, backend=_backend)
OPS["moe_gating", "reference"] = ReferenceGating
OPS["moe_dispatch_layout", "reference"] = ReferenceLayout
OPS["moe_permute", "reference"] = ReferencePermute
OPS["moe_unpermute", "reference"] = ReferenceUnpermute


def kernel_backend(kernels, device, shipped_fits=False):
    """`runtime.kernels` and `runtime.device` ("CPU" | "Ascend") -> a KERNEL_BACKENDS name.

    auto: ascend_builtin where it can run (`shipped_fits`: `ops.shipped.unfit` finds no reason against the run),
    else reference: on CPU the custom kernels made the MoE layer slower (docs/architecture.md, Kernels), and the
    Ascend C kernels must be built first (kernels/ascend/README.md).
    """
    if kernels not in KERNELS:
        raise ValueError(f"runtime.kernels = {kernels!r}: must be one of {', '.join(KERNELS)}")
    if kernels == "auto":
        return "ascend_builtin" if shipped_fits else "reference"
    if kernels in ("reference", "ascend_builtin"):
        return kernels
    return "cpu" if device == "CPU" else "ascend_c"


def run_kernel_backend(cfg):
    """`kernel_backend` of a `RunConfig`."""
    return kernel_backend(cfg.runtime.kernels, cfg.runtime.device, unfit(cfg) is None)


def make_op(name, backend, *args, **kwargs):
    """The cell for op `name` on `backend`, built with the op's own arguments (see each op's module)."""
    if (name, backend) not in OPS:
        ops_names = sorted({op for op, _ in OPS})
        raise ValueError(f"kernel op {name!r} on backend {backend!r}: ops are {', '.join(ops_names)}; "
                         f"backends are {', '.join(KERNEL_BACKENDS)}")
    return OPS[name, backend](*args, **kwargs)
