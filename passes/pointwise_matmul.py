"""pointwise_matmul: 1x1 convolutions as matrix products.

A 1x1 convolution with stride 1 is a matrix product over the channel axis:

    Conv2D(x, W[1, 1, Cin, Cout])  ==  Reshape(MatMul(Reshape(x, [-1, Cin]), W[Cin, Cout]), [N, H, W, Cout])

On this project's machine (x86, TensorFlow's default oneDNN kernels, 2 cores) a small convolution
costs about 50 us more than the matrix product, whatever its size, when TensorFlow runs it on more
than one thread (benchmarks/README.md, "1x1 convolutions as matrix products"): at batch 1 a
shrunk MobileNetV2's 35 pointwise convolutions spend most of their time there. A large
convolution gains nothing by it and can lose: ResNet50's dense frozen model (its 1x1 convolutions
mostly 16.8M multiply-adds at 128x128) ran batch 1 in 26.1-29.0 ms with every one a MatMul,
against 23.6-24.1 ms. And a MatMul costs TensorFlow a fusion where a convolution's output meets a
residual Add: oneDNN fuses Conv2D + BiasAdd + Add (+ ReLU) into one call, not the MatMul form,
whose Reshape back also hides from Grappler that the Add's two inputs have the same batch size
(a shrunk ResNet50 at 50%, whose 1x1 convolutions are all 4.2M multiply-adds, ran batch 1 5-15%
faster with none of them rewritten, in six paired timings). So ``max_macs`` (finalize's default,
``pointwise_matmul="auto"``: AUTO_MAX_MACS) rewrites only convolutions of at most that many
multiply-adds per image (H x W x Cin x Cout, the output's height and width known); None
(``pointwise_matmul=True``) rewrites every one.

Matches, in every body at any depth: a Conv2D, channels last, strides and dilations 1, padding
SAME or VALID (or EXPLICIT all zero), float, whose kernel is a Const or a variable read (through
Identity nodes) of static shape [1, 1, Cin, Cout], and whose input is known to have Cin channels
(a grouped convolution's has groups x Cin: left as it is, as is an input of unknown channels).
Shapes come from TensorFlow's inference on the top graph, and from the _output_shapes a trace
recorded in function bodies. The BiasAdd and the activation after it (Relu,
Relu6, Elu, LeakyRelu, Tanh, Sigmoid), each read by the next alone (through Identity nodes, which
move along), move into the flat form too,
so TensorFlow fuses them with the MatMul as it fused them with the convolution. The chain's last
op becomes the Reshape back (same name: its readers need no rewiring); the convolution is dead
(strip_unused removes it). The kernel, Const or variable, keeps its shape and is reshaped where
it is read (TensorFlow folds the Reshape of a Const): no weight is copied.

Postcondition: the outputs equal the input model's up to float rounding (the same products,
summed by another kernel); finalize's check runs both models.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune.channels import _static_shapes
from graphprune.errors import GraphPruneError
from graphprune.passbase import Option, PassContext, PassResult, register_pass
from graphprune.passes.fold_batch_norms import _returned, sole_reader

FLOAT_TYPES = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)
ACTIVATIONS = {"Relu", "Relu6", "Elu", "LeakyRelu", "Tanh", "Sigmoid"}
# finalize's pointwise_matmul="auto": the most multiply-adds per image of a convolution it rewrites.
# Measured at batch 1 on TensorFlow's default threads (2 cores, oneDNN; benchmarks/conv_vs_matmul.py
# --sweep), a MatMul took, of a 1x1 convolution's time: on an earlier host 0.45x-0.65x up to 4.2M,
# 0.75x-0.99x at 8.4M and 1.00x-1.11x at 16.8M; on an AMD EPYC (AVX-512) 0.45x-0.81x up to 3.3M,
# 0.89x-1.11x at 4.2M, 1.08x-1.22x at 8.4M and 0.90x-1.56x at 16.8M. Past 3.5M the gain is small
# on one host and a loss on the other, before the residual Adds' fusions are counted (module
# docstring). At batch 32 (0.73x-1.36x) and on one thread (0.75x-1.44x) neither form wins by size.
AUTO_MAX_MACS = 3_500_000


def pointwise_matmul(model: g.TracedModel, context: PassContext, max_macs: int | None = None) -> PassResult:
    """Every 1x1, stride-1 Conv2D with a constant or variable kernel as a MatMul (module docstring);
    with ``max_macs``, only those of at most that many multiply-adds per image (of known height
    and width)."""
    if max_macs is not None and max_macs < 0:
        raise GraphPruneError(f"pass 'pointwise_matmul': option max_macs must be >= 0, got {max_macs}")
    rewritten, left = [], []

    def rewrite(body, entry, shapes):
        returned = _returned(body, entry)
        for node in list(body.nodes):
            kernel = _pointwise_kernel(body, model, node)
            if kernel is None:
                continue
            if not body.is_function and not shapes:  # the top graph's static shapes, once per entry
                shapes.update(_top_shapes(entry, model))
            x_name, x_index, _ = body.parse(body.data_inputs(node)[0])
            if body.is_function:
                x_shape, out_shape = _recorded(body, x_name, x_index), _recorded(body, node.name, 0)
            else:
                x_shape, out_shape = shapes.get((x_name, x_index)), shapes.get((node.name, 0))
            if not x_shape or len(x_shape) != 4 or x_shape[3] != kernel.shape[2]:
                continue  # input channels unknown, or a grouped convolution (Cin = groups x the kernel's)
            spatial = _spatial(out_shape)
            if max_macs is not None and (spatial is None or
                                         spatial[0] * spatial[1] * kernel.shape[2] * kernel.shape[3] > max_macs):
                left.append(body.use_name(node))  # too large to gain, or of unknown size
                continue
            _rewrite(body, node, kernel, returned, spatial)
            rewritten.append(body.use_name(node))

    entries = tuple(b.rewrite_entry(entry, lambda body, entry=entry, shapes={}: rewrite(body, entry, shapes))[0]
                    for entry in model.entries)
    if not rewritten:
        return PassResult(model, changed=False, report={"rewritten": [], "left": sorted(left)})
    return PassResult(dataclasses.replace(model, entries=entries), changed=True,
                      report={"rewritten": sorted(rewritten), "left": sorted(left)})


def _top_shapes(entry: g.Entry, model: g.TracedModel) -> dict:
    """_static_shapes of the entry's top graph; none (every conv there left as it is) where
    TensorFlow cannot import it for inference."""
    try:
        return _static_shapes(entry, model)
    except (ValueError, TypeError, tf.errors.OpError):
        return {}


@dataclasses.dataclass
class _Kernel:
    ref: str      # the conv's kernel input
    shape: tuple  # (1, 1, Cin, Cout), static: a Const's or the variable's


def _pointwise_kernel(body: b.Body, model: g.TracedModel, node) -> _Kernel | None:
    if node.op != "Conv2D" or node.attr["T"].type not in FLOAT_TYPES or len(body.data_inputs(node)) != 2:
        return None
    layout = node.attr["data_format"].s.decode() if "data_format" in node.attr else ""
    strides = list(node.attr["strides"].list.i)
    dilations = list(node.attr["dilations"].list.i) if "dilations" in node.attr else []
    padding = node.attr["padding"].s.decode()
    explicit = list(node.attr["explicit_paddings"].list.i) if "explicit_paddings" in node.attr else []
    if layout not in ("", "NHWC") or any(s != 1 for s in strides) or any(d != 1 for d in dilations):
        return None
    if padding not in ("SAME", "VALID") and not (padding == "EXPLICIT" and not any(explicit)):
        return None
    ref = body.data_inputs(node)[1]
    shape = kernel_shape(body, model, ref)
    return _Kernel(ref, shape) if shape is not None and _is_pointwise(shape) else None


def kernel_shape(body: b.Body, model: g.TracedModel, ref: str) -> tuple | None:
    """The static shape of a kernel that is a Const or a variable read (through Identity nodes)."""
    producer = body.producer(ref)
    for _ in range(8):
        if producer is None:
            return None
        if producer.op == "Const":
            return tuple(d.size for d in producer.attr["value"].tensor.tensor_shape.dim)
        key = body.read_key(producer)
        if key is not None:
            return tuple(model.variables[key].shape) if key in model.variables else None
        if producer.op != "Identity":
            return None
        producer = body.producer(body.data_inputs(producer)[0])
    return None


def _is_pointwise(shape) -> bool:
    return len(shape) == 4 and shape[0] == 1 and shape[1] == 1 and all(isinstance(d, int) and d > 0 for d in shape)


def _chain(body: b.Body, conv, returned: set) -> list:
    """The BiasAdd and activation after ``conv`` that move into the flat form, in order, with the
    Identity nodes before each (fold_batch_norms leaves one where a scale alone was folded)."""
    chain = []

    def following(node, ops):
        link = _next_link(body, node, returned, ops | {"Identity"})
        identities = []
        while link is not None and link.op == "Identity":
            identities.append(link)
            link = _next_link(body, link, returned, ops | {"Identity"})
        return identities, link

    identities, link = following(conv, {"BiasAdd"} | ACTIVATIONS)
    if link is not None and link.op == "BiasAdd":
        if "data_format" in link.attr and link.attr["data_format"].s not in (b"", b"NHWC"):
            return chain
        chain += identities + [link]
        identities, link = following(link, ACTIVATIONS)
    if link is not None:
        chain += identities + [link]
    return chain


def _next_link(body: b.Body, node, returned: set, ops: set):
    """The op of ``ops`` reading ``node`` alone, as its first input and in the same type; else None.
    (The op is checked first: a reader's attrs are read only where it has them.)"""
    found = sole_reader(body, node, returned)
    if found is None or found[0].op not in ops or found[1] != 0 or found[0].attr["T"].type != node.attr["T"].type:
        return None
    return found[0]


def _rewrite(body: b.Body, conv, kernel: _Kernel, returned: set, spatial: tuple | None) -> None:
    dtype = tf.dtypes.as_dtype(conv.attr["T"].type)
    cin, cout = kernel.shape[2], kernel.shape[3]
    base = conv.name
    x = body.data_inputs(conv)[0]
    controls = [raw for raw in conv.input if raw.startswith("^")]

    const, node = b.builders(body, base)
    int32 = tf.int32
    flat = node("flat", "Reshape", [x, const("flat_shape", np.array([-1, cin], np.int32), "int32")], T=dtype,
                Tshape=int32)
    # a Reshape of the kernel, Const or variable read alike: no weight is copied (another reader may
    # share it), and TensorFlow folds it where the kernel is a constant
    matrix = node("matrix", "Reshape", [kernel.ref, const("matrix_shape", np.array([cin, cout], np.int32), "int32")],
                  T=dtype, Tshape=int32)
    product = node("matmul", "MatMul", [flat, matrix] + controls, T=dtype, transpose_a=False, transpose_b=False)
    chain = _chain(body, conv, returned)
    for link in chain:  # a copy reading the flat tensor; the original becomes dead or the Reshape back
        copy = g.make_node(body.fresh(f"{link.name}/flat"), link.op, [product] + list(link.input[1:]))
        for attr, value in link.attr.items():
            if attr != "_output_shapes":  # the flat tensor's shape is another
                copy.attr[attr].CopyFrom(value)
        if link.op == "BiasAdd":
            copy.attr["data_format"].s = b"NHWC"
        product = body.ref(body.add(copy).name)
    if spatial is not None:  # static sizes: one Const, no shape arithmetic at run time
        out_shape = const("out_shape", np.array([-1, *spatial, cout], np.int32), "int32")
    else:
        out_shape = _out_shape(node, const, x, dtype, cout)
    last = chain[-1] if chain else conv
    back = g.make_node(last.name, "Reshape", [product, out_shape], T=dtype, Tshape=int32)
    body.replace(last, back)


def _spatial(shape) -> tuple | None:
    """(height, width) of an NHWC shape where both are known."""
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:3]):
        return None
    return shape[1], shape[2]


def _recorded(body: b.Body, name: str, index: int) -> list | None:
    """The shape of a function body's node output or argument as the trace recorded it
    (_output_shapes), None for an unknown dim; None where it was not recorded."""
    node = body.node(name)
    if node is not None:
        attrs = node.attr
    else:
        position = next((i for i, arg in enumerate(body.proto.signature.input_arg) if arg.name == name), None)
        if position is None or position not in body.proto.arg_attr:
            return None
        attrs, index = body.proto.arg_attr[position].attr, 0
    shapes = attrs["_output_shapes"].list.shape if "_output_shapes" in attrs else []
    if index >= len(shapes) or shapes[index].unknown_rank:
        return None
    return [d.size if d.size >= 0 else None for d in shapes[index].dim]


def _out_shape(node, const, x, dtype, cout) -> str:
    """concat(shape(x)[:-1], [cout]), computed at run time."""
    int32 = tf.int32
    shape = node("shape", "Shape", [x], T=dtype, out_type=int32)
    outer = node("outer", "StridedSlice", [shape, const("begin", np.array([0], np.int32), "int32"),
                                           const("end", np.array([-1], np.int32), "int32"),
                                           const("strides", np.array([1], np.int32), "int32")],
                 T=int32, Index=int32, begin_mask=0, end_mask=0, ellipsis_mask=0,
                 new_axis_mask=0, shrink_axis_mask=0)
    out_shape = node("out_shape", "ConcatV2", [outer, const("channels", np.array([cout], np.int32), "int32"),
                                               const("axis", np.array(0, np.int32), "int32")],
                     T=int32, Tidx=int32, N=2)
    return out_shape


register_pass("pointwise_matmul", pointwise_matmul, options=[
    Option("max_macs", "int", None, "rewrite only 1x1 convs of at most this many multiply-adds per image (height "
           f"and width known; finalize's default: {AUTO_MAX_MACS}); unset: every one"),
], invalidates=("weights", "channel_groups"))
