"""expand_new_axes: the new axes of a StridedSlice as ExpandDims, for TFLite's converter.

``x[:, None, :, :]`` traces to a StridedSlice with a ``new_axis_mask``. TFLite's converter lowers
such a slice only where it can compute the output shape; on a dynamic input (a keras-hub text
model's attention mask, [batch, sequence, sequence]) it refuses the whole model: "'tf.StridedSlice'
op is neither a custom op nor a flex op". Every keras-hub decoder (Llama, Gemma, Mistral, Qwen) and
T5 were refused so, dense or pruned. This pass rewrites

    StridedSlice(x, begin, end, strides, new_axis_mask=N, ...)
        ==  ExpandDims(... ExpandDims(StridedSlice(x, begin', end', strides', ...), a1) ..., ak)

where begin', end', strides' and the other masks drop the new-axis slots, and a1 < ... < ak are
the output positions of the new axes: counted from the front for a slot before the ellipsis (or
where there is none), from the back (negative) after it, so no rank need be known. The slice is
left out where what remains takes everything (full ranges, stride 1, no shrink); a slice of new
axes only becomes an Identity. The last ExpandDims keeps the slice's name, so its readers need no
rewiring.

Matches, in every body at any depth: a StridedSlice with a non-zero new_axis_mask whose begin,
end and strides are Consts (directly or through Identity nodes) and where no new-axis slot also
shrinks. Anything else is left as it is.

Postcondition: the outputs equal the input model's, bit for bit (the same elements, in the same
order, with the same shape).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune.passbase import PassContext, PassResult, entries_result, register_pass
from graphprune.passes.fold_pads import _constant

MASKS = ("begin_mask", "end_mask", "ellipsis_mask", "shrink_axis_mask")


def expand_new_axes(model: g.TracedModel, context: PassContext) -> PassResult:
    """Every StridedSlice that adds axes, as a slice without them and ExpandDims (module docstring)."""
    rewritten = []

    def rewrite(body):
        for node in list(body.nodes):
            if node.op == "StridedSlice" and node.attr["new_axis_mask"].i and _split(body, node):
                rewritten.append(body.use_name(node))

    entries = tuple(b.rewrite_entry(entry, rewrite)[0] for entry in model.entries)
    return entries_result(model, entries, "rewritten", rewritten)


def _bit(mask: int, i: int) -> bool:
    return bool((mask >> i) & 1)


def _split(body: b.Body, node) -> bool:
    """Rewrite one StridedSlice with new axes; False (nothing changed) where it does not match."""
    inputs = body.data_inputs(node)
    if len(inputs) != 4:
        return False
    bounds = [_constant(body, ref) for ref in inputs[1:]]
    if any(v is None or v.ndim != 1 for v in bounds) or len({v.size for v in bounds}) != 1:
        return False
    begin, end, strides = bounds
    masks = {name: node.attr[name].i for name in MASKS}
    slots = begin.size
    ellipsis = masks["ellipsis_mask"]
    first_ellipsis = next((i for i in range(slots) if _bit(ellipsis, i)), None)
    # an ellipsis bit wins over a new-axis bit on the same slot, as in TensorFlow's kernel
    new = [i for i in range(slots) if _bit(node.attr["new_axis_mask"].i, i) and not _bit(ellipsis, i)]
    if not new or any(_bit(masks["shrink_axis_mask"], i) for i in new):
        return False
    keep = [i for i in range(slots) if i not in new]

    def makes_axis(j):  # a kept slot that is an output dimension
        return not _bit(masks["shrink_axis_mask"], j) and not _bit(ellipsis, j)

    positions = []
    for i in new:
        if first_ellipsis is None or i < first_ellipsis:
            # earlier new axes are in place already; an ellipsis before i would make this unknowable
            positions.append(sum(1 for j in range(i) if j in new or makes_axis(j)))
        else:
            positions.append(-1 - sum(1 for j in range(i + 1, slots) if j not in new and makes_axis(j)))

    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    index_type = tf.dtypes.as_dtype(node.attr["Index"].type)
    const, make = b.builders(body, node.name)
    x = inputs[0]
    controls = [raw for raw in node.input if raw.startswith("^")]
    takes_all = all(_bit(ellipsis, i) or (
        (_bit(masks["begin_mask"], i) or (begin[i] == 0 and strides[i] > 0)) and _bit(masks["end_mask"], i)
        and strides[i] == 1 and not _bit(masks["shrink_axis_mask"], i)) for i in keep)
    if keep and not takes_all:
        kept = [const(f"sliced_{label}", np.asarray(values[keep]), index_type.name)
                for label, values in zip(("begin", "end", "strides"), bounds)]
        compressed = {name: sum(1 << k for k, i in enumerate(keep) if _bit(mask, i)) for name, mask in masks.items()}
        x = make("sliced", "StridedSlice", [x, *kept] + controls, T=dtype, Index=index_type, new_axis_mask=0,
                 **compressed)
        controls = []
    for n, position in enumerate(positions):
        axis = const(f"axis_{n}", np.asarray(position, np.int32), "int32")
        if n < len(positions) - 1:
            x = make(f"expanded_{n}", "ExpandDims", [x, axis] + controls, T=dtype, Tdim=tf.int32)
            controls = []
            continue
        expand = g.make_node(node.name, "ExpandDims", [x, axis] + controls, T=dtype, Tdim=tf.int32)
        if "_output_shapes" in node.attr:  # the last keeps the slice's name and output
            expand.attr["_output_shapes"].CopyFrom(node.attr["_output_shapes"])
        body.replace(node, expand)
    return True


register_pass("expand_new_axes", expand_new_axes, invalidates=("weights", "channel_groups"))
