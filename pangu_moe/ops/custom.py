"""One `ops.Custom` AOT op for the `cpu` or `ascend_c` kernel backend, with its reg_info.

The same wrapper serves both backends (kernels/README.md): on CPU `func` is
`<library>:<Name>` from `ops.build`; on Ascend it is the op name of the installed Ascend C package.
The reg_info names the current target only (a list of targets fails on CPU) and fixes the dtypes,
so MindSpore casts other float inputs to f32 instead of handing the kernel the wrong buffer.
"""
from mindspore import ops
from mindspore.ops import CustomRegOp, DataType

from pangu_moe.ops.build import library_path

CUSTOM_BACKENDS = ("cpu", "ascend_c")
TARGETS = {"cpu": "CPU", "ascend_c": "Ascend"}
DTYPES = {"f32": DataType.F32_Default, "i32": DataType.I32_Default, "i8": DataType.I8_Default,
          "bool": DataType.BOOL_Default}


def aot_op(name, backend, inputs, outputs, out_shape, out_dtype, bprop=None, attrs=None):
    """A Custom op.

    Args:
        name: the kernel's symbol (CPU) and op type (Ascend), e.g. "MoePermute".
        backend: "cpu" or "ascend_c".
        inputs, outputs: sequences of (name, dtype key of DTYPES), in the kernel's parameter order.
        out_shape, out_dtype: infer functions of the input shapes / dtypes (named defs: graph mode
            cannot parse lambdas in every position).
        bprop: backward function, or None for ops without a gradient.
        attrs: {name: int} op attributes: the Ascend C op definition requires them; on CPU they only
            key MindSpore's infer cache, which otherwise reuses one instance's output shapes for
            another instance of the same kernel with different K or E.
    Returns:
        an `ops.Custom` primitive.
    """
    if backend not in CUSTOM_BACKENDS:
        raise ValueError(f"kernel backend {backend!r}: must be one of {', '.join(CUSTOM_BACKENDS)}")
    reg = CustomRegOp(name)
    for i, (arg, _) in enumerate(inputs):
        reg = reg.input(i, arg)
    for i, (arg, _) in enumerate(outputs):
        reg = reg.output(i, arg)
    if backend == "ascend_c":
        for attr, value in (attrs or {}).items():
            reg = reg.attr(attr, "required", "int", value=str(value))
    reg = reg.dtype_format(*(DTYPES[dtype] for _, dtype in tuple(inputs) + tuple(outputs)))
    func = f"{library_path()}:{name}" if backend == "cpu" else name
    op = ops.Custom(func, out_shape, out_dtype, func_type="aot", bprop=bprop,
                    reg_info=reg.target(TARGETS[backend]).get_op_info())
    for attr, value in (attrs or {}).items():
        op.add_prim_attr(attr, value)
    return op
