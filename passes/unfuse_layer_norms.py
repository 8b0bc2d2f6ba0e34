"""unfuse_layer_norms: a layer norm computed by FusedBatchNorm written as the ops Keras 3 uses.

tf-keras's LayerNormalization (its fused path, over the last axis) computes

    Reshape(x, [1, N, D, 1]) -> FusedBatchNormV3(scale=ones, offset=zeros, NCHW, training)
                             -> Reshape(., Shape(x))          then * gamma + beta

which normalizes each row of D channels in a batch norm's layout. The channel analysis cannot
follow the stream's channels through that layout, so prune(residual_stream=True) runs this pass
first: each match becomes, under the second Reshape's name,

    mean = Mean(x, -1, keep_dims)         centered = x - mean
    variance = Mean(Square(centered), -1, keep_dims)
    centered * Rsqrt(variance + epsilon)

whose two Means insert_masks then makes means over the kept channels (as for Keras 3's layer
norms). Matched in the top graph of every entry (where kept-channel means are made): a
FusedBatchNorm / V2 / V3 in NCHW with is_training, float32 or float64, scale all ones and offset
all zeros; its input a Reshape of x (static last dimension D) to a shape computed as [1, N, D, 1];
its first output alone read, by a Reshape back to x's shape (Shape(x), or x's static shape). The
fused chain (the Reshapes' shape arithmetic, the ones and zeros) is deleted where nothing else
reads it. Anything else is left as it is.

Postcondition: the outputs equal the input model's up to float rounding (the batch norm's
normalization uses the same biased variance: the mean of squared deviations).
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune.analysis import has_side_effect
from graphprune.passbase import PassContext, PassResult, register_pass

FUSED_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def _known(shapes: dict, body: b.Body, ref: str):
    name, index, _ = body.parse(ref)
    return shapes.get((name, index))


def _filled_with(body: b.Body, ref: str, value: float, evaluate) -> bool:
    """Whether a tensor is a constant (or a Fill) whose every element is ``value``."""
    node = body.producer(ref)
    while node is not None and node.op in ("Identity", "Cast"):
        node = body.producer(node.input[0])
    if node is None:
        return False
    if node.op == "Const":
        return bool(np.all(tf.make_ndarray(node.attr["value"].tensor) == value))
    if node.op == "Fill":
        filled = evaluate(body.data_inputs(node)[1])
        return filled is not None and not isinstance(filled, list) and filled == value
    return False


def _matches(body: b.Body, shapes: dict, fused) -> tuple | None:
    """(x, the Reshape back) of a fused layer norm (module docstring), or None."""
    from graphprune.channels import _constant, _evaluate

    adapter = types.SimpleNamespace(body=body, shape=lambda ref: _known(shapes, body, ref))
    evaluate = lambda ref: _constant(adapter, ref)  # noqa: E731
    attr = fused.attr
    if attr["data_format"].s != b"NCHW" or not attr["is_training"].b or \
            attr["T"].type not in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        return None  # half precision: the fused op computes its statistics in float32
    inputs = body.data_inputs(fused)
    flat = body.producer(inputs[0])
    if flat is None or flat.op != "Reshape" or len(body.consumers(flat.name)) != 1:
        return None
    x = flat.input[0]
    x_shape = _known(shapes, body, x)
    if not x_shape or len(x_shape) < 2 or x_shape[-1] is None:
        return None
    sizes = _evaluate(adapter, flat.input[1], 0)  # [1, N, D, 1]: N may be unknown
    if not isinstance(sizes, list) or len(sizes) != 4 or [sizes[0], sizes[2], sizes[3]] != \
            [1, x_shape[-1], 1]:
        return None
    if not (_filled_with(body, inputs[1], 1.0, evaluate) and _filled_with(body, inputs[2], 0.0, evaluate)):
        return None
    readers = body.consumers(fused.name)
    if len(readers) != 1 or body.parse(readers[0][0].input[readers[0][1]])[1] != 0:
        return None
    back = readers[0][0]
    if back.op != "Reshape" or readers[0][1] != 0:
        return None
    target = body.producer(back.input[1])
    same_shape = target is not None and target.op == "Shape" and body.parse(target.input[0])[:2] == body.parse(x)[:2]
    if not same_shape and (_known(shapes, body, back.name) != x_shape or None in x_shape):
        return None
    return x, back


def _unfuse(body: b.Body, x: str, back, epsilon: float, dtype) -> None:
    name = back.name
    part = lambda label: f"{name}/unfused/{label}"  # noqa: E731
    axis = body.add(g.const_node(part("axis"), np.array([-1], np.int32), "int32"))
    mean = body.add(g.make_node(part("mean"), "Mean", [x, body.ref(axis.name)], T=dtype, Tidx=tf.int32,
                                keep_dims=True))
    centered = body.add(g.make_node(part("centered"), "Sub", [x, body.ref(mean.name)], T=dtype))
    square = body.add(g.make_node(part("square"), "Square", [body.ref(centered.name)], T=dtype))
    variance = body.add(g.make_node(part("variance"), "Mean", [body.ref(square.name), body.ref(axis.name)], T=dtype,
                                    Tidx=tf.int32, keep_dims=True))
    eps = body.add(g.const_node(part("epsilon"), np.array(epsilon, dtype.as_numpy_dtype), dtype.name))
    shifted = body.add(g.make_node(part("variance_epsilon"), "AddV2", [body.ref(variance.name), body.ref(eps.name)],
                                   T=dtype))
    inverse = body.add(g.make_node(part("rsqrt"), "Rsqrt", [body.ref(shifted.name)], T=dtype))
    replacement = g.make_node(name, "Mul", [body.ref(centered.name), body.ref(inverse.name)], T=dtype)
    replacement.input.extend(i for i in back.input if i.startswith("^"))
    body.replace(back, replacement)


def _dead_after(body: b.Body, start: list[str], dead: set[str] = frozenset()) -> set[str]:
    """``start``, ``dead`` and every node that only they (transitively) read, if it has no side
    effect."""
    memo: dict = {}
    dead, pending = set(dead), list(start)
    while pending:
        name = pending.pop()
        node = body.node(name)
        if name in dead or node is None or node.op == "Placeholder" or has_side_effect(body, node, memo):
            continue
        if any(reader.name not in dead for reader, _ in body.consumers(name)) and name not in start:
            continue
        dead.add(name)
        pending.extend(body.source(raw) for raw in node.input)
    return dead


def _rewrite(body: b.Body, shapes: dict) -> int:
    count, dead = 0, set()
    for name in [node.name for node in body.nodes if node.op in FUSED_OPS]:
        fused = body.node(name)
        found = _matches(body, shapes, fused)
        if found is None:
            continue
        x, back = found
        flat = body.producer(body.data_inputs(fused)[0])
        _unfuse(body, x, back, float(fused.attr["epsilon"].f), tf.dtypes.as_dtype(fused.attr["T"].type))
        dead = _dead_after(body, [fused.name, flat.name], dead)  # earlier norms' dead nodes read nothing
        count += 1
    if dead:  # one deletion: each rebuilds the node list
        body.delete({node.name for node in body.nodes} - dead)
    return count


def unfuse_layer_norms(model: g.TracedModel, context: PassContext) -> PassResult:
    """Write every fused layer norm (tf-keras) as Mean / Square / Rsqrt ops (module docstring)."""
    from graphprune.channels import _static_shapes

    entries, total = [], 0
    for entry in model.entries:
        if entry.kind == "update" or not any(node.op in FUSED_OPS and node.attr["data_format"].s == b"NCHW"
                                             for node in entry.graph_def.node):
            entries.append(entry)
            continue
        shapes = _static_shapes(entry, model)
        counted = []

        def rewrite(body, shapes=shapes, counted=counted):
            if not body.is_function:
                counted.append(_rewrite(body, shapes))

        rewritten, _ = b.rewrite_entry(entry, rewrite)
        total += sum(counted)
        entries.append(rewritten if sum(counted) else entry)
    if not total:
        return PassResult(model, changed=False, report={"unfused": 0})
    return PassResult(dataclasses.replace(model, entries=tuple(entries)), changed=True, report={"unfused": total})


register_pass("unfuse_layer_norms", unfuse_layer_norms, invalidates=("weights", "channel_groups"))
