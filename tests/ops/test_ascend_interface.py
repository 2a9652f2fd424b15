"""The Ascend C op definitions (kernels/ascend/<op>/op_host/<op>.cpp) declare exactly the inputs, outputs,
dtypes and attributes that the Python side registers for the `ascend` backend (MindSpore matches them by
name and position). The Ascend kernels cannot run here; this checks their interface against ours."""
import re
from pathlib import Path

import pytest
from mindspore import ops

from pangu_moe.ops import make_op

ASCEND = Path(__file__).resolve().parents[2] / "pangu_moe" / "kernels" / "ascend"
GE_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_INT8": "int8", "DT_BOOL": "bool"}
CELLS = {"moe_gating": (1, 8, 1), "moe_dispatch_layout": (1, 8, 4, 2), "moe_permute": (4,), "moe_unpermute": ()}


def snake(op_type):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op_type).lower()


def declared(op_type):
    """(inputs, outputs, attrs) of the OpDef in the op_host source: [(name, dtype)], [(name, dtype)], [name]."""
    source = (ASCEND / snake(op_type) / "op_host" / f"{snake(op_type)}.cpp").read_text()
    body = source[source.index(f"class {op_type} : public OpDef"):]
    body = body[:body.index("OP_ADD")]

    def tensors(kind):
        return [(name, GE_DTYPES[dtype]) for name, dtype in
                re.findall(kind + r'\("(\w+)"\)[^;]*?DataType\(\{ge::(\w+)\}\)', body)]
    return tensors("Input"), tensors("Output"), re.findall(r'Attr\("(\w+)"\)', body)


def registered():
    """Every Custom primitive of the ascend-backend cells, by op type, with its reg_info."""
    found = {}
    for name, args in CELLS.items():
        cell = make_op(name, "ascend_c", *args)
        for attr in dir(cell):
            prim = getattr(cell, attr, None)
            if isinstance(prim, ops.Custom):
                found[prim.func] = prim.reg_info
    return found


@pytest.mark.parametrize("op_type", ["MoeGating", "MoeGatingGrad", "MoeDispatchLayout", "MoePermute", "MoeUnpermute",
                                     "MoeUnpermuteGrad"])
def test_op_definition_matches_the_registration(op_type):
    reg = registered()[op_type]
    inputs, outputs, attrs = declared(op_type)
    dtypes = [dtype for dtype, _ in reg["dtype_format"][0]]
    assert [(i["name"], d) for i, d in zip(reg["inputs"], dtypes)] == inputs
    assert [(o["name"], d) for o, d in zip(reg["outputs"], dtypes[len(inputs):])] == outputs
    assert [a["name"] for a in reg.get("attr", [])] == attrs
    assert reg["target"] == "Ascend"
