"""find_weights: record every variable read as a weight by a prunable op (analysis only).

Matches, in every entry, a prunable op whose weight operand comes from a variable read:

    Placeholder(resource) -> [Identity]* -> ReadVariableOp -> [Identity | Cast]* -> MatMul
                                                           \\-> Mul(., read(<w>/graphprune/mask))   (already masked)

Prunable ops and the operands that may be weights: MatMul, BatchMatMul{,V2,V3} (either operand),
Conv2D, Conv3D, DepthwiseConv2dNative, Conv2DBackpropInput (the filter), Einsum (any operand);
with include_gather, also embedding lookups (ResourceGather; GatherV2/Gather params). A lookup of
an already masked table always counts, so a reloaded prunable model reports it without the flag.
Function calls are inlined by the loader, so weights inside nested tf.functions are found too;
While and If bodies (which stay functional) are searched as well: there the weight enters as a
resource argument of the body (RNN recurrent kernels).

Postcondition: ``model.facts["weights"]`` is a tuple of WeightInfo, one per variable (a weight
used by several ops or entries appears once); the graphs are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from graphprune import functions
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
# Opt-in (include_gather): lookups of an embedding table read from its variable. Keras 3 reads
# the table and gathers from the tensor (GatherV2); tf.nn.embedding_lookup on a variable uses
# ResourceGather on the resource itself (matched separately).
GATHER_OPS = {"GatherV2": (0,), "Gather": (0,)}
PASS_THROUGH_OPS = ("Identity", "Cast", "Snapshot")
# A weight seen through a view is still the weight: Keras 3 EinsumDense reshapes its kernel
# (Reshape -> BatchMatMulV2), Conv1D expands it (ExpandDims -> Conv2D), tf.matmul(x,
# tf.transpose(w)) transposes it. The op's axes no longer map to the variable's, so its input
# axis becomes unknown (M:N refuses such a weight rather than guess).
RESHAPE_OPS = ("Reshape", "ExpandDims", "Squeeze", "Transpose")


class Traced(NamedTuple):
    key: str
    read: object
    mask: str | None
    reshaped: bool = False
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


def _trace(raw: str, producer, resource):
    """Follow a tensor back through Identity/Cast/Reshape and a mask Mul to a variable read.

    ``producer(raw)`` finds the node making a tensor; ``resource(read)`` gives the variable key a
    ReadVariableOp reads (or None). Returns Traced(key, read, mask key, reshaped) or None."""
    mask_key, reshaped = None, False
    node = producer(raw)
    for _ in range(64):
        if node is None:
            return None
        if node.op in PASS_THROUGH_OPS or node.op in RESHAPE_OPS:
            reshaped |= node.op in RESHAPE_OPS
            node = producer(node.input[0])
        elif node.op == "Mul" and is_mask_multiply(node):
            mask_key = resource(producer(node.input[1]))
            node = producer(node.input[0])
        elif node.op == "ReadVariableOp":
            key = resource(node)
            return Traced(key, node, mask_key, reshaped) if key is not None else None
        else:
            return None
    return None


def trace_to_variable(index: g.NodeIndex, entry: g.Entry, raw_input: str):
    """In an entry's graph: the variable (and mask) a tensor reads, or None."""
    return _trace(raw_input, index.producer, lambda read: resource_of(index, entry, read))


def trace_in_body(body: dict, arguments: dict, raw: str):
    """In a While/If body (``arguments``: resource arg -> variable key): the same."""

    def resource(read):
        if read is None or read.op != "ReadVariableOp":
            return None
        return arguments.get(functions.producer_name(read.input[0]))

    return _trace(raw, lambda name: body.get(functions.producer_name(name)), resource)


def is_mask_multiply(node) -> bool:
    """The Mul(read(w), read(mask)) that insert_masks adds is named '<w>/graphprune/masked[_N]'."""
    return f"/{g.SCOPE}/masked" in node.name


def resource_of(index: g.NodeIndex, entry: g.Entry, read_node):
    """The variable key a ReadVariableOp reads (through Identity chains), or None."""
    if read_node is None or read_node.op != "ReadVariableOp":
        return None
    return resource_key(index, entry, read_node.input[0])


def resource_key(index: g.NodeIndex, entry: g.Entry, resource_input: str):
    """The variable key behind a resource tensor (a placeholder, through Identity chains), or None."""
    node = index.producer(resource_input)
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
    """Record every variable read by MatMul/Conv/Einsum ops as a prunable weight (analysis).

    include_gather: also embedding tables looked up with ResourceGather, or with GatherV2 from
    the table's read (opt-in)."""
    ops = dict(PRUNABLE_OPS, **GATHER_OPS)  # a lookup counts only opted in or already masked (below)
    found: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    nested: dict[str, str] = {}

    def record(entry, traced, node, operand, use_name):
        key, mask_key = traced.key, traced.mask
        spec = model.variables[key]
        if spec.role != g.ROLE_OTHER:
            return
        if node.op in GATHER_OPS and not include_gather and not (mask_key or _existing_mask(model, key)):
            return
        if spec.dtype not in FLOAT_DTYPES:
            skipped[key] = f"dtype {spec.dtype} is not a float type"
            return
        info = found.setdefault(key, {"uses": [], "axis": None, "mask": None})
        info["uses"].append(Use(entry.name, use_name, node.op, operand))
        if info["axis"] is None and not traced.reshaped:
            info["axis"] = input_axis(node, operand, len(spec.shape))
        info["mask"] = info["mask"] or mask_key or _existing_mask(model, key)

    for entry in model.entries:
        if entry.kind == "update":
            continue
        index = g.NodeIndex(entry.graph_def)
        for node in entry.graph_def.node:
            for operand, raw in weight_operands(node, ops):
                traced = trace_to_variable(index, entry, raw)
                if traced is not None:
                    record(entry, traced, node, operand, node.name)
            if include_gather and node.op == "ResourceGather":
                # opt-in: an embedding table looked up from its resource is a weight too
                key = resource_key(index, entry, node.input[0])
                if key is not None:
                    record(entry, Traced(key, None, _existing_mask(model, key)), node, 0, node.name)
        # While/If bodies: weights enter as resource arguments (RNN recurrent kernels).
        for outer, _, function, offset in functions.functional_nodes(entry):
            arguments = functions.argument_resources(index, entry, outer, function, offset)
            if not arguments:
                continue
            for node, operand, traced in _body_weight_reads(function, arguments, ops):
                record(entry, traced, node, operand, f"{outer.name}/{function.signature.name}/{node.name}")
            nested_ops = ops if include_gather else PRUNABLE_OPS
            for key in _nested_reads(function, arguments, nested_ops, functions.library_of(entry.graph_def)):
                nested.setdefault(key, "read by a MatMul/Conv inside a While/If body nested in another body; "
                                       "nested bodies are not searched, so it is not pruned")
    for key, reason in nested.items():
        if key not in found:
            skipped[key] = reason
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


def _nested_reads(function, arguments: dict, ops, library) -> list[str]:
    """Variable keys that a While/If inside ``function`` (a body) passes on to a prunable op of its
    own bodies: weights this pass does not reach, so that they are reported instead of silently
    left dense."""
    keys = []
    for node in function.node_def:
        for attr, offset in functions.body_attrs(node):
            inner = library.get(node.attr[attr].func.name)
            if inner is None:
                continue
            inner_arguments = functions.resource_arguments(node, inner, offset,
                                                           lambda raw: arguments.get(functions.producer_name(raw)))
            if inner_arguments:
                keys += [traced.key for _, _, traced in _body_weight_reads(inner, inner_arguments, ops)]
    return keys


def _body_weight_reads(function, arguments: dict, ops):
    """(node, operand, Traced) for each prunable operand of a body that reads a variable argument."""
    body = functions.body_index(function)
    for node in function.node_def:
        for operand, raw in weight_operands(node, ops):
            traced = trace_in_body(body, arguments, raw)
            if traced is not None:
                yield node, operand, traced


def weight_operands(node, ops=PRUNABLE_OPS):
    """(operand position, input) pairs of ``node`` that may hold a weight."""
    if node.op not in ops:
        return []
    data_inputs = [i for i in node.input if not i.startswith("^")]
    positions = range(len(data_inputs)) if ops[node.op] is None else ops[node.op]
    return [(p, data_inputs[p]) for p in positions if p < len(data_inputs)]


def _existing_mask(model: g.TracedModel, key: str) -> str | None:
    candidate = f"{key}/{g.SCOPE}/mask"
    return candidate if candidate in model.variables else None


def weights_of(model: g.TracedModel) -> tuple[WeightInfo, ...]:
    """The weights recorded by find_weights (runs it if it has not run)."""
    if "weights" not in model.facts:
        return find_weights(model, PassContext()).model.facts["weights"]
    return model.facts["weights"]


register_pass("find_weights", find_weights)
