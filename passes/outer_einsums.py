"""outer_einsums: an Einsum that sums over nothing, as a broadcast Mul, for TFLite's converter.

TFLite's converter lowers an Einsum to batched matrix products, and refuses one that contracts no
index: "'tf.Einsum' op is neither a custom op nor a flex op". keras-hub's Gemma 4 computes its
rotary angles so, ``einsum("ab,c->abc", positions, inverse_frequencies)``, and was refused, dense
or pruned. This pass rewrites

    Einsum(x, y, equation="<x's indices>,<y's indices>-><output's>")
        ==  Mul(view(x), view(y))

where each operand's view puts its axes in the output's order (a Transpose where they are not) and
a size-1 axis where the output has an index the operand lacks (ExpandDims), so that the Mul
broadcasts to the output. Its name is the Einsum's.

Matches, in every body at any depth: an Einsum of two operands whose equation has no ellipsis, no
index repeated within an operand, and every index of the operands in the output, once. Anything
else is left as it is.

Postcondition: the outputs equal the input model's, bit for bit (each element is the same single
product).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune.passbase import PassContext, PassResult, entries_result, register_pass


def outer_einsums(model: g.TracedModel, context: PassContext) -> PassResult:
    """Every two-operand Einsum without a contracted index, as a broadcast Mul (module docstring)."""
    rewritten = []

    def rewrite(body):
        for node in list(body.nodes):
            if node.op == "Einsum" and outer_equation(node) is not None:
                _rewrite(body, node)
                rewritten.append(body.use_name(node))

    entries = [b.rewrite_entry(entry, rewrite)[0] for entry in model.entries]
    return entries_result(model, entries, "rewritten", rewritten)


def outer_equation(node) -> tuple[str, str, str] | None:
    """(x's indices, y's indices, the output's) of an Einsum that only multiplies; else None."""
    if node.attr["N"].i != 2:
        return None
    equation = node.attr["equation"].s.decode().replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    operands, output = equation.split("->")
    parts = operands.split(",")
    if len(parts) != 2:
        return None
    x, y = parts
    if any(len(set(p)) != len(p) for p in (x, y, output)) or set(x) | set(y) != set(output):
        return None
    return x, y, output


def _rewrite(body: b.Body, node) -> None:
    x_indices, y_indices, output = outer_equation(node)
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    controls = [raw for raw in node.input if raw.startswith("^")]
    const, make = b.builders(body, node.name)

    views = []
    for label, ref, indices in zip(("x", "y"), body.data_inputs(node), (x_indices, y_indices)):
        ordered = sorted(indices, key=output.index)
        if list(ordered) != list(indices):
            permutation = np.array([indices.index(i) for i in ordered], np.int32)
            order = const(f"{label}_permutation", permutation, "int32")
            ref = make(f"{label}_transposed", "Transpose", [ref, order], T=dtype, Tperm=tf.int32)
        for position, index in enumerate(output):  # a one where the output has an index it lacks
            if index not in indices:
                axis = const(f"{label}_axis", np.array(position, np.int32), "int32")
                ref = make(f"{label}_expanded", "ExpandDims", [ref, axis], T=dtype, Tdim=tf.int32)
        views.append(ref)
    product = g.make_node(node.name, "Mul", views + controls, T=dtype)
    if "_output_shapes" in node.attr:
        product.attr["_output_shapes"].CopyFrom(node.attr["_output_shapes"])
    body.replace(node, product)


register_pass("outer_einsums", outer_einsums, invalidates=("weights", "channel_groups"))
