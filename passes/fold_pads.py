"""fold_pads: a zero Pad before a VALID convolution that pads as SAME would, folded into it.

Keras pads the input of its stride-2 depthwise convolutions explicitly (MobileNet, MobileNetV2,
EfficientNet: ZeroPadding2D(imagenet_utils.correct_pad(...)) then padding="valid"), and those
pads are what SAME padding adds for that input size: none or one row and column before, one
after. So

    DepthwiseConv2dNative(Pad(x, [[0, 0], [t, b], [l, r], [0, 0]]), w, padding="VALID")
        ==  DepthwiseConv2dNative(x, w, padding="SAME")        when (t, b), (l, r) are SAME's

and likewise for Conv2D. TensorFlow runs the Pad as an op of its own before a depthwise
convolution (oneDNN fuses it into a Conv2D, not there): at batch 1, a copy of the activation and
one more call (TFLite's converter folds such Pads itself). SAME pads a dimension of size n,
kernel k, stride s and dilation d by ``total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n,
0)``, ``total // 2`` before and the rest after.

Matches, in every body at any depth: a Conv2D or DepthwiseConv2dNative, channels last (NHWC),
float, padding VALID, whose input is a Pad (or a PadV2 of constant 0) with constant paddings that
are zero on the batch and the channels and SAME's on height and width, the Pad's input of static
height and width (TensorFlow's inference on the top graph; the _output_shapes a trace recorded in
function bodies), and the kernel a Const or a variable read (through Identity nodes) of static
shape. The convolution reads the Pad's input with padding SAME (same name: its readers need no
rewiring); a Pad read nowhere else is dead (strip_unused removes it). Anything else (other
pads, a MirrorPad, channels-first layouts, unknown sizes) is left as it is.

Postcondition: the outputs equal the input model's (the same zeros are added, by the kernel
instead of the Pad); finalize's check runs both models.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2, types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune.passbase import PassContext, PassResult, entries_result, register_pass
from graphprune.passes.pointwise_matmul import _recorded, _top_shapes, kernel_shape

FLOAT_TYPES = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)
CONVOLUTIONS = ("Conv2D", "DepthwiseConv2dNative")


def fold_pads(model: g.TracedModel, context: PassContext) -> PassResult:
    """Every Pad before a VALID convolution that adds what SAME padding would, folded into it
    (module docstring)."""
    folded = []

    def rewrite(body, entry, shapes):
        for node in list(body.nodes):
            pad = _padded_convolution(body, node)
            if pad is None:
                continue
            if not body.is_function and not shapes:  # the top graph's static shapes, once per entry
                shapes.update(_top_shapes(entry, model))
            x = body.data_inputs(pad)[0]
            name, index, _ = body.parse(x)
            shape = _recorded(body, name, index) if body.is_function else shapes.get((name, index))
            kernel = kernel_shape(body, model, body.data_inputs(node)[1])
            if shape is None or len(shape) != 4 or kernel is None or len(kernel) != 4:
                continue
            if _pads(pad, body) != _same_pads(node, shape[1:3], kernel[:2]):
                continue
            replacement = node_def_pb2.NodeDef()
            replacement.CopyFrom(node)
            replacement.input[0] = x
            replacement.attr["padding"].s = b"SAME"
            body.replace(node, replacement)
            folded.append(body.use_name(node))

    entries = tuple(b.rewrite_entry(entry, lambda body, entry=entry, shapes={}: rewrite(body, entry, shapes))[0]
                    for entry in model.entries)
    return entries_result(model, entries, "folded", folded)


def _padded_convolution(body: b.Body, node):
    """The Pad (or zero PadV2) a VALID, channels-last, float convolution reads its input from; else None."""
    if node.op not in CONVOLUTIONS or node.attr["T"].type not in FLOAT_TYPES or len(body.data_inputs(node)) != 2:
        return None
    layout = node.attr["data_format"].s.decode() if "data_format" in node.attr else ""
    if layout not in ("", "NHWC") or node.attr["padding"].s != b"VALID":
        return None
    pad = body.producer(body.data_inputs(node)[0])
    if pad is None or pad.op not in ("Pad", "PadV2") or pad.attr["T"].type != node.attr["T"].type:
        return None
    if pad.op == "PadV2":
        value = _constant(body, body.data_inputs(pad)[2])
        if value is None or value.size != 1 or float(value.reshape(())) != 0.0:
            return None
    return pad


def _pads(pad, body: b.Body) -> tuple | None:
    """((top, bottom), (left, right)) of a Pad that pads nothing on the batch and the channels; else None."""
    value = _constant(body, body.data_inputs(pad)[1])
    if value is None or value.shape != (4, 2) or value[0].any() or value[3].any():
        return None
    return tuple(tuple(int(v) for v in row) for row in value[1:3])


def _same_pads(conv, sizes, kernel) -> tuple | None:
    """What SAME padding adds before and after each spatial dimension of sizes ``sizes``."""
    strides = list(conv.attr["strides"].list.i)
    dilations = list(conv.attr["dilations"].list.i) if "dilations" in conv.attr else [1, 1, 1, 1]
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides[1:3], dilations[1:3]):
        if not isinstance(n, int) or n <= 0 or not isinstance(k, int) or k <= 0:
            return None
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _constant(body: b.Body, ref: str) -> np.ndarray | None:
    """The value of a Const read directly or through Identity nodes; else None."""
    producer = body.producer(ref)
    for _ in range(8):
        if producer is None:
            return None
        if producer.op == "Const":
            return tf.make_ndarray(producer.attr["value"].tensor)
        if producer.op != "Identity":
            return None
        producer = body.producer(body.data_inputs(producer)[0])
    return None


register_pass("fold_pads", fold_pads, invalidates=("weights", "channel_groups"))
