"""static_batch: give every entry a fixed batch size, for converters that need static shapes.

TFLite's converter refuses TensorList ops whose element shape is not static, and a Keras RNN
traced with an unknown batch stores its per-step list elements as [-1, units]. This pass sets the
leading dimension of every input whose batch is unknown to ``batch_size`` (placeholders, the
entry's input specs) and, in the element_shape Consts of the TensorList ops of every body at
any depth, replaces a leading
-1 (the batch, for time-major RNN lists) by ``batch_size``. Outputs are unchanged for inputs of
that batch size; other batch sizes are refused by the rewritten model.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune.errors import PassError
from graphprune.passbase import Option, PassContext, PassResult, register_pass

# TensorList op -> index of its element_shape input.
ELEMENT_SHAPE_INPUT = {"TensorListReserve": 0, "EmptyTensorList": 0, "TensorListFromTensor": 1,
                       "TensorListStack": 1, "TensorListGetItem": 2, "TensorListPopBack": 1,
                       "TensorListGather": 2, "TensorListConcatV2": 1}


def static_batch(model: g.TracedModel, context: PassContext, batch_size: int = 1) -> PassResult:
    """Fix the batch dimension of every entry's inputs and TensorList element shapes."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PassError(f"static_batch: batch_size must be a positive integer, got {batch_size!r}")
    entries, report = [], {"inputs": 0, "element_shapes": 0}
    for entry in model.entries:
        placeholders = {info.placeholder for info in entry.inputs}

        def fix(body: b.Body) -> None:
            for node in list(body.nodes):
                if not body.is_function and node.name in placeholders:
                    shape = node.attr["shape"].shape
                    if not shape.unknown_rank and shape.dim and shape.dim[0].size == -1:
                        shape.dim[0].size = batch_size
                        report["inputs"] += 1
                        body.mark_changed()
                position = ELEMENT_SHAPE_INPUT.get(node.op)
                if position is None or position >= len(node.input):
                    continue
                source = body.producer(node.input[position])
                if source is None or source.op != "Const":
                    continue
                value = tf.make_ndarray(source.attr["value"].tensor)
                if value.ndim == 1 and value.size and value[0] == -1:
                    value = value.copy()
                    value[0] = batch_size
                    source.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
                    report["element_shapes"] += 1
                    body.mark_changed()

        rewritten, changed = b.rewrite_entry(entry, fix)
        if not changed:
            entries.append(entry)
            continue
        inputs = tuple(dataclasses.replace(info, shape=_with_batch(info.shape, batch_size)) for info in entry.inputs)
        structure = tf.nest.map_structure(
            lambda leaf: tf.TensorSpec(_with_batch(tuple(leaf.shape.as_list()), batch_size), leaf.dtype, leaf.name)
            if isinstance(leaf, tf.TensorSpec) and leaf.shape.rank else leaf, entry.input_structure)
        entries.append(dataclasses.replace(rewritten, inputs=inputs, input_structure=structure))
    if not any(report.values()):
        return PassResult(model, changed=False, report=report)
    return PassResult(dataclasses.replace(model, entries=tuple(entries)), changed=True, report=report)


def _with_batch(shape, batch_size):
    if not shape:
        return shape
    return (batch_size if shape[0] is None else shape[0], *shape[1:])


register_pass("static_batch", static_batch, options=[
    Option("batch_size", "int", 1, "the fixed batch size"),
])
