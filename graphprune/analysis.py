"""Analyses of a traced model, shared by passes and runtime code (none of them rewrites).

    trace(body, ref)          follow a tensor back through Identity/Cast/views and a mask Mul
                              to the variable read it comes from
    input_axis(node, ...)     the weight axis a prunable op reduces over (M:N groups run along it)
    weight_reads(body, ops)   the prunable operands of a body that read a variable
    find_prunable_weights     every weight of a model, in every body at any depth, and the ones
                              that are not float (skipped, with the reason)
    written_variables(model)  variables some op assigns (state: never frozen)

Facts recorded on a TracedModel (``model.facts``), with their types:

    weights          tuple[WeightInfo, ...]   find_weights; insert_masks updates it; passes that
                                              fold, freeze or strip drop it
    skipped_weights  dict[str, str]           weight key -> why it is not pruned
    update_config    str                      insert_mask_updates: what the update entry was built for
    channel_groups   tuple[ChannelGroup, ...] insert_mask_updates with structure='channel' (channels.py)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from graphprune import body as b
from graphprune import graph as g
from graphprune import names

# op type -> operand positions that may hold a weight (None: every operand)
PRUNABLE_OPS = {
    "MatMul": (0, 1),
    "SparseMatMul": (0, 1),  # tf.matmul(..., a_is_sparse=True or b_is_sparse=True): a MatMul with hints
    "BatchMatMul": (0, 1),
    "BatchMatMulV2": (0, 1),
    "BatchMatMulV3": (0, 1),
    "Conv2D": (1,),
    "Conv3D": (1,),
    "DepthwiseConv2dNative": (1,),
    "Conv2DBackpropInput": (1,),
    "Conv3DBackpropInputV2": (1,),  # Conv3DTranspose
    "Einsum": None,
    # tf.sparse.sparse_dense_matmul(sparse features, kernel): (indices, values, dense shape, kernel)
    "SparseTensorDenseMatMul": (3,),
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
# A part of a weight is the weight too (Keras 3's GRU multiplies by slices of its recurrent kernel,
# one per gate): the mask covers the whole variable; a slice that keeps every axis keeps the op's
# input axis, one that indexes an axis away or adds one is a view as above.
SLICE_OPS = ("StridedSlice", "Slice")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
WRITE_OP_PREFIXES = ("Assign", "ResourceScatter", "ResourceApply", "ResourceSparseApply",
                     "ResourceStridedSliceAssign", "DestroyResourceOp")

FACT_TYPES = {"weights": tuple, "skipped_weights": dict, "update_config": str, "channel_groups": tuple}


class Traced(NamedTuple):
    key: str
    read: object
    mask: str | None
    reshaped: bool = False


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


def weight_source(body: b.Body, ref: str):
    """(node, mask key, seen through a view): what tensor ``ref`` comes from past Identity/Cast,
    views and a mask Mul; node None where nothing is reached within b.MAX_DEPTH."""
    mask_key, reshaped = None, False
    node = body.producer(ref)
    for _ in range(b.MAX_DEPTH):
        if node is None:
            break
        if node.op in PASS_THROUGH_OPS or node.op in RESHAPE_OPS or node.op in SLICE_OPS:
            reshaped |= node.op in RESHAPE_OPS or (node.op == "StridedSlice" and any(
                node.attr[mask].i for mask in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask")))
            node = body.producer(node.input[0])
        elif is_mask_multiply(node):
            mask_key = mask_operand_key(body, node)
            node = body.producer(node.input[0])
        else:
            return node, mask_key, reshaped
    return None, mask_key, reshaped


def trace(body: b.Body, ref: str) -> Traced | None:
    """Follow tensor ``ref`` back through Identity/Cast/views and a mask Mul to a variable read:
    Traced(variable key, the read node, mask key, seen through a view), or None."""
    node, mask_key, reshaped = weight_source(body, ref)
    key = body.read_key(node)  # None unless a ReadVariableOp
    return Traced(key, node, mask_key, reshaped) if key is not None else None


def is_mask_multiply(node) -> bool:
    return node.op == "Mul" and names.is_masked_node(node.name)


def mask_operand_key(body: b.Body, node) -> str | None:
    """The mask variable a mask multiply reads (through the Cast of a one-byte mask), or None."""
    mask = body.producer(node.input[1])
    if mask is not None and mask.op == "Cast":
        mask = body.producer(mask.input[0])
    return body.read_key(mask)


def input_axis(node, operand: int, rank: int) -> int | None:
    """The weight axis the op reduces over (where M:N groups are taken), non-negative."""
    op = node.op
    if op in ("MatMul", "SparseMatMul"):
        if operand == 1:
            axis = 1 if node.attr["transpose_b"].b else 0
        else:
            axis = 0 if node.attr["transpose_a"].b else 1
    elif op.startswith("BatchMatMul"):
        if operand == 1:
            axis = -1 if node.attr["adj_y"].b else -2
        else:
            axis = -2 if node.attr["adj_x"].b else -1
    elif op == "SparseTensorDenseMatMul":
        axis = 1 if node.attr["adjoint_b"].b else 0
    elif op in ("Conv2D", "Conv3D"):
        axis = -2
    elif op in ("Conv2DBackpropInput", "Conv3DBackpropInputV2"):
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


def weight_operands(node, ops=PRUNABLE_OPS) -> list[tuple[int, str]]:
    """(operand position, input) pairs of ``node`` that may hold a weight."""
    if node.op not in ops:
        return []
    data_inputs = [i for i in node.input if not i.startswith("^")]
    positions = range(len(data_inputs)) if ops[node.op] is None else ops[node.op]
    return [(p, data_inputs[p]) for p in positions if p < len(data_inputs)]


def weight_reads(body: b.Body, ops=PRUNABLE_OPS):
    """(node, operand, Traced) for each prunable operand of ``body`` that reads a variable."""
    for node in body.nodes:
        for operand, raw in weight_operands(node, ops):
            traced = trace(body, raw)
            if traced is not None:
                yield node, operand, traced


def existing_mask(model: g.TracedModel, key: str) -> str | None:
    candidate = names.mask_key(key)
    return candidate if candidate in model.variables else None


def find_prunable_weights(model: g.TracedModel, include_gather: bool = False):
    """(weights, skipped): a WeightInfo per variable read by a prunable op in any body of any
    entry (a weight used by several ops or entries appears once), and the weights left out."""
    ops = dict(PRUNABLE_OPS, **GATHER_OPS)  # a lookup counts only opted in or already masked (below)
    found: dict[str, dict] = {}
    skipped: dict[str, str] = {}

    def record(entry, traced, node, operand, use_name):
        key, mask_key = traced.key, traced.mask
        spec = model.variables[key]
        if spec.role != names.ROLE_OTHER:
            return
        if node.op in GATHER_OPS and not include_gather and not (mask_key or existing_mask(model, key)):
            return
        if spec.dtype not in FLOAT_DTYPES:
            skipped[key] = f"dtype {spec.dtype} is not a float type"
            return
        info = found.setdefault(key, {"uses": [], "axis": None, "mask": None})
        info["uses"].append(Use(entry.name, use_name, node.op, operand))
        if info["axis"] is None and not traced.reshaped:
            info["axis"] = input_axis(node, operand, len(spec.shape))
        info["mask"] = info["mask"] or mask_key or existing_mask(model, key)

    derived: dict[str, str] = {}
    for entry in model.entries:
        if entry.kind == "update":
            continue

        def visit(body, entry=entry):
            for node, operand, traced in weight_reads(body, ops):
                record(entry, traced, node, operand, body.use_name(node))
            for key, reason in derived_weight_reads(body, {info.placeholder for info in entry.inputs}).items():
                spec = model.variables.get(key)
                if spec is not None and spec.role == names.ROLE_OTHER and spec.dtype in FLOAT_DTYPES:
                    derived.setdefault(key, reason)
            if include_gather:
                for node in body.nodes:
                    if node.op == "ResourceGather":  # an embedding table looked up from its resource
                        key = body.resource_key(node.input[0])
                        if key is not None:
                            record(entry, Traced(key, None, existing_mask(model, key)), node, 0, body.use_name(node))

        b.visit_entry(entry, visit)
    for key, reason in derived.items():
        if key not in found:
            skipped.setdefault(key, reason)
    weights = tuple(
        WeightInfo(key=key, shape=model.variables[key].shape, dtype=model.variables[key].dtype,
                   uses=tuple(info["uses"]), input_axis=info["axis"], mask=info["mask"])
        for key, info in found.items()
    )
    return weights, skipped


def derived_weight_reads(body: b.Body, inputs: set[str]) -> dict[str, str]:
    """Variables that reach a prunable operand only through ops graphprune does not follow (a
    weight computed from variables: w / norm(w), w * scale, ...): key -> why it is not pruned.

    An operand that depends on no data input (the entry's inputs at the top, a body's non-resource
    arguments) is a function of variables and constants alone; the variables it reads are
    weights graphprune cannot mask where they are used, so they are reported, never silently
    left dense. Activations (which depend on the inputs) are not weights and are not looked at."""
    import networkx as nx

    untraced = [(node, raw) for node in body.nodes for _, raw in weight_operands(node)
                if trace(body, raw) is None]
    if not untraced:
        return {}
    graph = b.dependency_graph(body)
    if body.is_function:
        sources = {arg.name for arg in body.proto.signature.input_arg if arg.name not in body.resources}
    else:
        sources = set(inputs) | {n.name for n in body.nodes if n.op == "Placeholder" and n.name not in body.resources}
    start = object()
    graph.add_edges_from((start, source) for source in sources if source in graph)
    data_dependent = nx.descendants(graph, start) if start in graph else set()
    found: dict[str, str] = {}
    for node, raw in untraced:
        source = body.source(raw)
        if source in data_dependent or source not in graph:
            continue
        upstream = nx.ancestors(graph, source) | {source}
        path_ops = sorted({body.node(n).op for n in upstream if body.node(n) is not None
                           and body.node(n).op not in ("ReadVariableOp", "Placeholder", "Const")})
        for name in upstream:
            key = body.read_key(body.node(name))
            if key is not None:
                found.setdefault(key, f"reaches {node.op} '{node.name}' only through {', '.join(path_ops) or 'ops'}, "
                                      "which graphprune does not follow (a weight computed from variables); it is "
                                      "not pruned: exclude it, or compute the weight outside the graph")
    return found


def weights_of(model: g.TracedModel) -> tuple[WeightInfo, ...]:
    """The weights recorded by find_weights, or found now when no fact is recorded."""
    if "weights" not in model.facts:
        return find_prunable_weights(model)[0]
    return model.facts["weights"]


def written_variables(model: g.TracedModel) -> set[str]:
    """Keys of the variables some op assigns to (a counter, a running statistic), in any body of
    any entry."""
    written = set()

    def visit(body):
        for node in body.nodes:
            if node.op.startswith(WRITE_OP_PREFIXES) and node.input:
                key = body.resource_key(node.input[0])
                if key is not None:
                    written.add(key)

    for entry in model.entries:
        b.visit_entry(entry, visit)
    return written


SIDE_EFFECT_PREFIXES = ("Assign", "ResourceApply", "ResourceScatter", "ResourceSparseApply", "Print", "Write",
                        "Save", "Restore", "Enqueue", "Stateful", "While", "If", "Case")


def has_side_effect(body: b.Body, node, memo: dict) -> bool:
    """Whether running ``node`` matters beyond its outputs (NoOp/Identity: if what they group does)."""
    if node.name in memo:
        return memo[node.name]
    memo[node.name] = False  # breaks cycles
    if node.op in ("NoOp", "Identity"):
        result = any(has_side_effect(body, body.producer(raw), memo) for raw in node.input
                     if body.producer(raw) is not None)
    else:
        result = node.op.startswith(SIDE_EFFECT_PREFIXES) or "Summary" in node.op
    memo[node.name] = result
    return result


def effectful_control_outputs(body: b.Body, entry: g.Entry, memo: dict) -> tuple[str, ...]:
    """The entry's control outputs (of the top graph ``body``) that have a side effect."""
    return tuple(name for name in entry.control_outputs
                 if body.node(name) is not None and has_side_effect(body, body.node(name), memo))


def live_roots(body: b.Body, entry: g.Entry, memo: dict) -> list[str]:
    """What a body runs for: a function's returns and every node with a side effect; the top
    graph's entry outputs, its inputs (kept even if unused) and its control outputs that have a
    side effect. What these need (body.live_nodes) is live: strip_unused deletes the rest, and
    the channel analysis does not read it."""
    if body.is_function:
        roots = [body.source(ref) for ref in body.outputs()]
        return roots + [node.name for node in body.nodes if has_side_effect(body, node, memo)]
    roots = [g.parse_input(name.split(":")[0])[0] for name in entry.outputs]
    roots += list(effectful_control_outputs(body, entry, memo))
    return roots + [info.placeholder for info in entry.inputs]
