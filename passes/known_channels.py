"""known_channels: a convolution's input channel count, as its kernel states it, made known to
TFLite's converter.

TFLite's converter lowers a Conv2D only where the input's channel count is static. Keras 3's
UpSampling2D (nearest) repeats rows and columns with ``tf.repeat``, whose Reshape computes its
shape at run time, so on an input of unknown height and width (a fully convolutional network:
U-Nets, VAE decoders, segmentation heads) the next convolution's input is [?, ?, ?, ?] and the
converter refuses the model: "'tf.Conv2D' op is neither a custom op nor a flex op" (keras-hub's
VAE, dense or pruned). This pass puts

    Reshape(x, ConcatV2([StridedSlice(Shape(x), [0], [-1]), [C]], 0))

in front of each such convolution, C the channel count its kernel reads: the converter's shape
inference takes the constant, TensorFlow runs the Reshape without a copy. Were the input's
channels not C (a grouped convolution reads C x groups), the Reshape fails at run time, never
silently.

Matches, in every body at any depth: Conv2D, DepthwiseConv2dNative and Conv3D (channels last),
and the gradient input of Conv2DBackpropInput and Conv3DBackpropInputV2 (transposed
convolutions), whose kernel is a Const or a variable read of static shape and whose input's channels are
unknown (the _output_shapes a trace recorded in function bodies; TensorFlow's inference on the top
graph) or come from a Reshape to a computed shape (through Identity nodes): a trace infers more
than the converter does, tf.repeat's channels among them. An input of another rank, or of a
known channel count the kernel does not read (a grouped convolution), is left as it is, as is
everything else.

Postcondition: the outputs equal the input model's, bit for bit.
"""

from __future__ import annotations

import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune.passbase import PassContext, PassResult, entries_result, register_pass
from graphprune.passes.pointwise_matmul import _out_shape, _recorded, _top_shapes, kernel_shape

# op -> (position of the input whose channels the kernel fixes, the kernel's axis that counts them, rank)
CONVOLUTIONS = {
    "Conv2D": (0, 2, 4),
    "DepthwiseConv2dNative": (0, 2, 4),
    "Conv3D": (0, 3, 5),
    "Conv2DBackpropInput": (2, 3, 4),
    "Conv3DBackpropInputV2": (2, 4, 5),
}


def known_channels(model: g.TracedModel, context: PassContext) -> PassResult:
    """A Reshape stating the channel count in front of every convolution whose input's channels
    are unknown (module docstring)."""
    stated = []

    def rewrite(body, entry, shapes):
        for node in list(body.nodes):
            found = _unknown_channels(body, model, entry, shapes, node)
            if found is None:
                continue
            position, channels = found
            dtype = tf.dtypes.as_dtype(node.attr["T"].type)
            const, make = b.builders(body, node.name)
            x = body.data_inputs(node)[position]
            shape = _out_shape(make, const, x, dtype, channels)
            known = make("known_channels", "Reshape", [x, shape], T=dtype, Tshape=tf.int32)
            body.set_input(node, list(node.input).index(x), known)
            stated.append(body.use_name(node))

    entries = tuple(b.rewrite_entry(entry, lambda body, entry=entry, shapes={}: rewrite(body, entry, shapes))[0]
                    for entry in model.entries)
    return entries_result(model, entries, "stated", stated)


def _unknown_channels(body: b.Body, model: g.TracedModel, entry: g.Entry, shapes: dict, node):
    """(input position, channel count) of a channels-last convolution whose input's channels are
    unknown and whose kernel's are known; else None."""
    if node.op not in CONVOLUTIONS:
        return None
    position, axis, rank = CONVOLUTIONS[node.op]
    layout = node.attr["data_format"].s.decode() if "data_format" in node.attr else ""
    inputs = body.data_inputs(node)
    if layout not in ("", "NHWC", "NDHWC") or len(inputs) <= max(position, 1):
        return None
    kernel = kernel_shape(body, model, inputs[1])
    if kernel is None or len(kernel) != rank or not isinstance(kernel[axis], int) or kernel[axis] <= 0:
        return None
    name, index, _ = body.parse(inputs[position])
    if body.is_function:
        shape = _recorded(body, name, index)
    else:
        if not shapes:  # the top graph's static shapes, once per entry (the None key: computed, empty)
            shapes.update(_top_shapes(entry, model) or {None: None})
        shape = shapes.get((name, index))
    if shape is not None and (len(shape) != rank or shape[-1] not in (None, kernel[axis])):
        return None  # another rank, or channels a grouped convolution reads: left as it is
    if shape is None or shape[-1] is None or computed_reshape(body, inputs[position]):
        return position, int(kernel[axis])
    return None


def computed_reshape(body: b.Body, ref: str) -> bool:
    """Whether tensor ``ref`` is a Reshape's (through Identity nodes) to a shape computed at run time:
    where the converter's shape inference loses the channels a trace recorded (tf.repeat's)."""
    producer = body.producer(ref)
    for _ in range(8):
        if producer is None:
            return False
        if producer.op == "Reshape":
            shape = body.producer(body.data_inputs(producer)[1])
            return shape is None or shape.op != "Const"
        if producer.op != "Identity":
            return False
        producer = body.producer(body.data_inputs(producer)[0])
    return False


register_pass("known_channels", known_channels, invalidates=("weights", "channel_groups"))
