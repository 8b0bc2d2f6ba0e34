"""find_weights: record every variable read as a weight by a prunable op (analysis only).

Matches, in every entry, a prunable op whose weight operand comes from a variable read:

    Placeholder(resource) -> [Identity]* -> ReadVariableOp -> [Identity | Cast]* -> MatMul
                                                           \\-> Mul(., read(<w>/graphprune/mask))   (already masked)

Prunable ops and the operands that may be weights: MatMul, BatchMatMul{,V2,V3} (either operand),
Conv2D, Conv3D, DepthwiseConv2dNative, Conv2DBackpropInput (the filter), Einsum (any operand).
Function calls are inlined by the loader, so weights inside nested tf.functions are found too.

Postcondition: ``model.facts["weights"]`` is a tuple of WeightInfo, one per variable (a weight
used by several ops or entries appears once); the graphs are unchanged.
"""

from __future__ import annotations

import dataclasses

from graphprune import graph as g
from graphprune.pipeline import PassContext, PassResult, register_pass

# op type -> operand positions that may hold a weight (None: every operand)
PRUNABLE_OPS = {
    "MatMul": (0, 1),
    "BatchMatMul": (0, 1),
    "BatchMatMulV2": (0, 1),
    "BatchMatMulV3": (0, 1),
    "Conv2D": (1,),
    "Conv3D": (1,),
    "DepthwiseConv2dNative": (1,),
    "Conv2DBackpropInput": (1,),
    "Einsum": None,
}
PASS_THROUGH_OPS = ("Identity", "Cast", "Snapshot")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Use:
    entry: str
    node: str
    op: str
    operand: int


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    """A prunable weight: its variable, where it is used, and how its input channels lie."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    uses: tuple[Use, ...]
    input_axis: int | None  # the axis reduced by the op (M:N groups run along it); None if unknown
    mask: str | None = None  # key of its mask variable, once masked

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(sorted({use.op for use in self.uses}))

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size


def trace_to_variable(index: g.NodeIndex, entry: g.Entry, raw_input: str):
    """Follow a tensor back to (variable key, ReadVariableOp node, mask key or None), or None."""
    mask_key = None
    node = index.producer(raw_input)
    for _ in range(64):
        if node is None:
            return None
        if node.op in PASS_THROUGH_OPS:
            node = index.producer(node.input[0])
        elif node.op == "Mul" and is_mask_multiply(node):
            mask_key = resource_of(index, entry, index.producer(node.input[1]))
            node = index.producer(node.input[0])
        elif node.op == "ReadVariableOp":
            key = resource_of(index, entry, node)
            return (key, node, mask_key) if key is not None else None
        else:
            return None
    return None


def is_mask_multiply(node) -> bool:
    """The Mul(read(w), read(mask)) that insert_masks adds is named '<w>/graphprune/masked[_N]'."""
    return f"/{g.SCOPE}/masked" in node.name


def resource_of(index: g.NodeIndex, entry: g.Entry, read_node):
    """The variable key a ReadVariableOp reads (through Identity chains), or None."""
    if read_node is None or read_node.op != "ReadVariableOp":
        return None
    node = index.producer(read_node.input[0])
    while node is not None and node.op == "Identity":
        node = index.producer(node.input[0])
    if node is None:
        return None
    return entry.resources.get(node.name)


def input_axis(node, operand: int, rank: int) -> int | None:
    """The weight axis the op reduces over (where M:N groups are taken), non-negative."""
    op = node.op
    if op == "MatMul":
        if operand == 1:
            axis = 1 if node.attr["transpose_b"].b else 0
        else:
            axis = 0 if node.attr["transpose_a"].b else 1
    elif op.startswith("BatchMatMul"):
        if operand == 1:
            axis = -1 if node.attr["adj_y"].b else -2
        else:
            axis = -2 if node.attr["adj_x"].b else -1
    elif op in ("Conv2D", "Conv3D"):
        axis = -2
    elif op == "Conv2DBackpropInput":
        axis = -1
    elif op == "Einsum":
        inputs, _, output = node.attr["equation"].s.decode().replace(" ", "").partition("->")
        operands = inputs.split(",")
        if operand >= len(operands) or "." in operands[operand]:
            return None
        reduced = [i for i, letter in enumerate(operands[operand]) if letter not in output]
        return reduced[0] if len(reduced) == 1 else None
    else:  # DepthwiseConv2dNative reduces over space only
        return None
    return axis % rank if rank else None


def find_weights(model: g.TracedModel, context: PassContext, include_gather: bool = False) -> PassResult:
    """Record every variable read by MatMul/Conv/Einsum ops as a prunable weight (analysis)."""
    ops = dict(PRUNABLE_OPS)
    if include_gather:
        ops["GatherV2"] = (0,)
    found: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for entry in model.entries:
        if entry.kind == "update":
            continue
        index = g.NodeIndex(entry.graph_def)
        for node in entry.graph_def.node:
            if node.op not in ops:
                continue
            operands = ops[node.op]
            data_inputs = [i for i in node.input if not i.startswith("^")]
            positions = range(len(data_inputs)) if operands is None else operands
            for operand in positions:
                if operand >= len(data_inputs):
                    continue
                traced = trace_to_variable(index, entry, data_inputs[operand])
                if traced is None:
                    continue
                key, _, mask_key = traced
                spec = model.variables[key]
                if spec.role != g.ROLE_OTHER:
                    continue
                if spec.dtype not in FLOAT_DTYPES:
                    skipped[key] = f"dtype {spec.dtype} is not a float type"
                    continue
                info = found.setdefault(key, {"uses": [], "axis": None, "mask": None})
                info["uses"].append(Use(entry.name, node.name, node.op, operand))
                if info["axis"] is None:
                    info["axis"] = input_axis(node, operand, len(spec.shape))
                info["mask"] = info["mask"] or mask_key or _existing_mask(model, key)
    weights = tuple(
        WeightInfo(
            key=key,
            shape=model.variables[key].shape,
            dtype=model.variables[key].dtype,
            uses=tuple(info["uses"]),
            input_axis=info["axis"],
            mask=info["mask"],
        )
        for key, info in found.items()
    )
    new_model = model.with_facts(weights=weights, skipped_weights=dict(skipped))
    report = {
        "weights": [w.key for w in weights],
        "skipped": skipped,
        "parameters": sum(w.size for w in weights),
    }
    # Analysis only: the graphs are untouched, so the model never counts as changed.
    return PassResult(new_model, changed=False, report=report)


def _existing_mask(model: g.TracedModel, key: str) -> str | None:
    candidate = f"{key}/{g.SCOPE}/mask"
    return candidate if candidate in model.variables else None


def weights_of(model: g.TracedModel) -> tuple[WeightInfo, ...]:
    """The weights recorded by find_weights (runs it if it has not run)."""
    if "weights" not in model.facts:
        return find_weights(model, PassContext()).model.facts["weights"]
    return model.facts["weights"]


register_pass("find_weights", find_weights)
