"""The kernel registry: (op, backend) -> the cell implementing it.

`reference` is plain MindSpore and the specification; `cpu` and `ascend` are the custom kernels.
`runtime.kernels` picks reference or custom, and the device picks which custom backend
(`kernel_backend`); nothing reads the environment.
"""
from functools import partial

from pangu_moe.config import KERNELS
from pangu_moe.ops.gating import CustomGating, ReferenceGating
from pangu_moe.ops.layout import CustomLayout, ReferenceLayout
from pangu_moe.ops.permute import CustomPermute, CustomUnpermute, ReferencePermute, ReferenceUnpermute

KERNEL_BACKENDS = ("reference", "cpu", "ascend")
OPS = {}
for _backend in ("cpu", "ascend"):
    OPS["moe_gating", _backend] = partial(CustomGating, backend=_backend)
    OPS["moe_dispatch_layout", _backend] = partial(CustomLayout, backend=_backend)
    OPS["moe_permute", _backend] = partial(CustomPermute, backend=_backend)
    OPS["moe_unpermute", _backend] = partial(CustomUnpermute, backend=_backend)
OPS["moe_gating", "reference"] = ReferenceGating
OPS["moe_dispatch_layout", "reference"] = ReferenceLayout
OPS["moe_permute", "reference"] = ReferencePermute
OPS["moe_unpermute", "reference"] = ReferenceUnpermute


def kernel_backend(kernels, device):
    """`runtime.kernels` ("reference" | "custom") and `runtime.device` ("CPU" | "Ascend") -> a KERNEL_BACKENDS name."""
    if kernels == "reference":
        return "reference"
    if kernels not in KERNELS:
        raise ValueError(f"runtime.kernels = {kernels!r}: must be one of {', '.join(KERNELS)}")
    return "cpu" if device == "CPU" else "ascend"


def make_op(name, backend, *args, **kwargs):
    """The cell for op `name` on `backend`, built with the op's own arguments (see each op's module)."""
    if (name, backend) not in OPS:
        ops_names = sorted({op for op, _ in OPS})
        raise ValueError(f"kernel op {name!r} on backend {backend!r}: ops are {', '.join(ops_names)}; "
                         f"backends are {', '.join(KERNEL_BACKENDS)}")
    return OPS[name, backend](*args, **kwargs)
