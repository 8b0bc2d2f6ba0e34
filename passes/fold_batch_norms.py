"""fold_batch_norms: fold per-channel scales and shifts into the kernel before them.

Inference batch normalization, as Keras 3 computes it, is elementwise arithmetic after the
convolution: ``y * inv + (beta - mean * inv)`` with ``inv = rsqrt(var + eps) * gamma``; tf-keras
and tf.nn.fused_batch_norm compute the same in one FusedBatchNormV3 op (is_training false). Where
those parameters are constants (freeze='all'), or with option ``variables`` variables that
nothing in the model writes (taken at their values now: finalize's default), the chain is an
affine map per output channel, ``y * s + t``, and

    Conv2D(x, W) * s + t  ==  BiasAdd(Conv2D(x, W * s), t)

(W scaled along its output-channel axis). The folded form is two ops instead of five or more,
and the one TensorFlow's CPU remapper fuses with the activation into a single kernel: at batch 1,
where a small model's time is per-op overhead, that is most of its latency.

Matches, in every body at any depth: a Conv2D / Conv3D / DepthwiseConv2dNative, a transposed
convolution (Conv2DBackpropInput / Conv3DBackpropInputV2; channels last all) or a MatMul whose
kernel is a Const, or a variable read only there (its value is scaled; every read of it anywhere
must fold with the same scale, and nothing may write it), followed by a chain of
Mul / RealDiv / Add / AddV2 / Sub / BiasAdd, each with an operand computed from constants alone
(and those variables, with ``variables``) that is one value or one value per output channel, and
FusedBatchNorm(V2/V3) in inference, channels last, whose four parameters are so and whose batch
statistics nothing reads, each link read by the next one only (the chain may start after Squeezes
of axes other than the channels, and the kernel be read through one ExpandDims: Keras's Conv1D and
DepthwiseConv1D as tf.nn.conv1d runs them). With ``variables``, a chain of shifts alone that
reads a variable (a plain bias) is left: that variable stays trainable. The chain's last op becomes the BiasAdd (an
Identity where the shift is zero; same name: its readers need no rewiring); the rest is dead
(strip_unused removes it). Anything else (a scale that varies along another axis, a link read
twice, a non-constant operand, channels-first layouts, non-float32/64 types) is left as it is.

Postcondition: the outputs equal the input model's up to float rounding (w * s is rounded once,
where the model rounded x . w and then the product with s); finalize's check runs both models.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune import names
from graphprune.analysis import written_variables
from graphprune.passbase import Option, PassContext, PassResult, register_pass

FLOAT_TYPES = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE)
CHAIN_OPS = {"Mul", "RealDiv", "Add", "AddV2", "Sub", "BiasAdd"}
FUSED_BATCH_NORMS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
PASS_THROUGH = {"Identity", "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "While",
                "StatelessWhile", "Case", "StatelessCase", "IdentityN"}
MAX_OPERAND_ELEMENTS = 1 << 16  # a per-channel scale or shift, not a weight
# the ops whose kernel (input 1) a chain after them folds into
KERNEL_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "MatMul", "Conv2DBackpropInput", "Conv3DBackpropInputV2")


@dataclasses.dataclass
class _Plan:
    kernel_op: str      # the Conv2D / MatMul node
    last: str           # the chain's last node, to become the BiasAdd
    scale: np.ndarray   # per output channel, float64
    shift: np.ndarray
    kernel: str         # the Const or ReadVariableOp node the kernel comes from
    key: str | None     # the variable's key where it is a ReadVariableOp
    axes: tuple         # the kernel's output-channel axes (two for a depthwise kernel: in, multiplier)
    head: str           # the node the BiasAdd reads: the kernel op, or the Squeeze after it (Conv1D)
    expand: str | None  # the ExpandDims between the kernel and the op (Conv1D), whose input a new
                        # constant replaces


def fold_batch_norms(model: g.TracedModel, context: PassContext, variables: bool = False) -> PassResult:
    """Fold every per-channel affine chain after a constant kernel into it (module docstring);
    with ``variables``, the chain's operands may read variables nothing writes (their values now)."""
    written = written_variables(model)

    def read(key):
        """A small variable's value, where ``variables`` lets the fold take it; else None."""
        spec = model.variables.get(key)
        if not variables or spec is None or key in written or None in spec.shape \
                or int(np.prod(spec.shape, dtype=np.int64)) > MAX_OPERAND_ELEMENTS:
            return None
        return context.value(model, key)

    proposed: dict[str, list[np.ndarray]] = {}
    uses: dict[str, int] = {}

    def survey(body, entry):
        for plan in _plans(body, model, _returned(body, entry), read):
            if plan.key is not None:
                proposed.setdefault(plan.key, []).append(plan.scale)
        for node in body.nodes:
            if node.op in PASS_THROUGH:
                continue
            for raw in body.data_inputs(node):
                key = body.resource_key(raw)
                if key is not None:
                    uses[key] = uses.get(key, 0) + 1

    for entry in model.entries:
        b.visit_entry(entry, lambda body, entry=entry: survey(body, entry))
    approved = {key for key, scales in proposed.items()
                if key not in written and uses.get(key) == len(scales)
                and all(np.array_equal(scales[0], scale) for scale in scales[1:])}

    folded = []
    specs = {}

    def rewrite(body, entry):
        for plan in _plans(body, model, _returned(body, entry), read):
            if plan.key is not None and plan.key not in approved:
                continue
            kernel_node = body.node(plan.kernel_op)
            dtype = g.node_dtype(kernel_node)
            if plan.key is None:
                value = _scaled(tf.make_ndarray(body.node(plan.kernel).attr["value"].tensor), plan)
                const = body.add(g.const_node(body.fresh(names.folded_kernel(plan.kernel)), value, dtype))
                if plan.expand is not None:
                    body.set_input(body.node(plan.expand), 0, body.ref(const.name))
                else:
                    body.set_input(kernel_node, 1, body.ref(const.name))
            elif plan.key not in specs:
                spec = model.variables[plan.key]
                specs[plan.key] = dataclasses.replace(spec, value=_scaled(context.value(model, plan.key), plan))
            if np.any(plan.shift):
                shift = body.add(g.const_node(body.fresh(f"{plan.last}/folded_shift"), plan.shift, dtype))
                last = g.make_node(plan.last, "BiasAdd", [body.ref(plan.head), body.ref(shift.name)],
                                   T=tf.dtypes.as_dtype(dtype))
            else:  # a scale alone (an attention's 1/sqrt(d), say): no bias of zeros to add and count
                last = g.make_node(plan.last, "Identity", [body.ref(plan.head)], T=tf.dtypes.as_dtype(dtype))
            body.replace(body.node(plan.last), last)
            folded.append(body.use_name(kernel_node))

    entries = tuple(b.rewrite_entry(entry, lambda body, entry=entry: rewrite(body, entry))[0]
                    for entry in model.entries)
    if not folded:
        return PassResult(model, changed=False, report={"folded": []})
    return PassResult(dataclasses.replace(model.with_variables(specs.values()), entries=entries), changed=True,
                      report={"folded": sorted(folded), "variables_scaled": sorted(specs)})


def _scaled(kernel: np.ndarray, plan: _Plan) -> np.ndarray:
    shape = [1] * kernel.ndim
    for axis in plan.axes:
        shape[axis] = kernel.shape[axis]
    return (kernel.astype(np.float64) * plan.scale.reshape(shape)).astype(kernel.dtype)


def _kernel_axes(node, kernel_shape) -> tuple | None:
    """The kernel's output-channel axes, or None where the op is not one this pass folds into."""
    layout = node.attr["data_format"].s.decode() if "data_format" in node.attr else ""
    if node.op == "Conv2D" and layout in ("", "NHWC") and len(kernel_shape) == 4:
        return (3,)
    if node.op == "Conv3D" and layout in ("", "NDHWC") and len(kernel_shape) == 5:
        return (4,)
    if node.op == "DepthwiseConv2dNative" and layout in ("", "NHWC") and len(kernel_shape) == 4:
        return (2, 3)  # output channel c * multiplier + m
    if node.op == "MatMul" and len(kernel_shape) == 2:
        return (0,) if node.attr["transpose_b"].b else (1,)
    # transposed convolutions: the kernel is [..., out, in]
    if node.op == "Conv2DBackpropInput" and layout in ("", "NHWC") and len(kernel_shape) == 4:
        return (2,)
    if node.op == "Conv3DBackpropInputV2" and layout in ("", "NDHWC") and len(kernel_shape) == 5:
        return (3,)
    return None


def _plans(body: b.Body, model: g.TracedModel, returned: set, read=lambda key: None) -> list[_Plan]:
    """Every foldable kernel + chain of one body (read only); ``returned``: the nodes whose
    values leave the body (they must keep them); ``read``: a variable's value for the chain's
    operands, or None where it may not be taken."""
    plans = []
    for node in body.nodes:
        if node.op not in KERNEL_OPS:
            continue
        if node.attr["T"].type not in FLOAT_TYPES or len(body.data_inputs(node)) < 2:
            continue
        found = _kernel_source(body, node, returned)
        if found is None:
            continue
        kernel, expand, inserted = found
        key = body.read_key(kernel)
        if key is None:
            shape = [d.size for d in kernel.attr["value"].tensor.tensor_shape.dim]
        else:
            shape = list(model.variables[key].shape)
        if expand is not None:  # the op reads the kernel with a size-1 axis inserted (Conv1D's [1, k, in, out])
            inserted = inserted + len(shape) + 1 if inserted < 0 else inserted
            if not 0 <= inserted <= len(shape):
                continue
            shape = shape[:inserted] + [1] + shape[inserted:]
        axes = _kernel_axes(node, shape)
        if axes is None or (expand is not None and inserted in axes):
            continue
        channels = int(np.prod([shape[a] for a in axes]))
        if expand is not None:  # the same axes of the kernel as stored
            axes = tuple(a - 1 if a > inserted else a for a in axes)
        taken = []  # the variables the chain's operands read

        def tracked(key):
            value = read(key)
            taken.append(value is not None)
            return value

        rank = len(shape)
        plan = _chain(body, node, channels, returned, tracked, rank)
        if plan is not None and any(taken) and not {"Mul", "RealDiv", *FUSED_BATCH_NORMS} & set(plan[3]):
            # a bias variable alone is no batch norm: it stays a variable (a constant bias folds)
            plan = _chain(body, node, channels, returned, rank=rank)
        if plan is not None:
            last, scale, shift, ops, head = plan
            if ops == ["BiasAdd"]:
                continue  # already the folded form
            plans.append(_Plan(node.name, last, scale, shift, kernel.name, key, axes, head,
                               None if expand is None else expand.name))
    return plans


def _kernel_source(body: b.Body, node, returned: set):
    """(the Const or ReadVariableOp behind ``node``'s kernel, the ExpandDims on the way or None,
    the axis it inserts) through Identity nodes and at most one ExpandDims of a constant axis (how
    tf.nn.conv1d reads a Conv1D's kernel), when nothing else reads it or the nodes between; else
    None."""
    reader = node
    producer = body.producer(body.data_inputs(node)[1])
    expand, inserted = None, 0
    for _ in range(8):
        if producer is not None and producer.op == "Const":
            return producer, expand, inserted  # the folded kernel is a new constant: others may read this one
        if producer is None or producer.name in returned or _data_readers(body, producer.name) != [reader.name]:
            return None
        if body.read_key(producer) is not None:
            return producer, expand, inserted
        if producer.op == "ExpandDims" and expand is None:
            axis = _evaluate(body, body.data_inputs(producer)[1], 0)
            if axis is None or axis.size != 1 or axis.dtype.kind != "i":
                return None
            expand, inserted = producer, int(axis.reshape(-1)[0])
        elif producer.op != "Identity":
            return None
        reader, producer = producer, body.producer(body.data_inputs(producer)[0])
    return None


def _data_readers(body: b.Body, name: str) -> list[str]:
    return [node.name for node, position in body.consumers(name) if not node.input[position].startswith("^")]


def _returned(body: b.Body, entry: g.Entry) -> set:
    """The nodes a body returns: a function's outputs, or the entry's at the top."""
    if body.is_function:
        return {body.source(ref) for ref in body.outputs()}
    return {g.parse_input(ref)[0] for ref in (*entry.outputs, *entry.control_outputs)}


def _chain(body: b.Body, kernel_op, channels: int, returned: set, read=lambda key: None, rank: int = 0):
    """(last node, scale, shift, ops, head) of the affine chain after ``kernel_op`` (of output rank
    ``rank``), which may start after Squeezes of axes other than the channels' (tf.nn.conv1d's
    output): ``head`` is the last of them, or the op; None if there is none."""
    scale, shift = np.ones(channels), np.zeros(channels)
    current, last, ops, head = kernel_op, None, [], kernel_op
    while True:
        found = sole_reader(body, current, returned)
        if found is None:
            break
        link, position = found
        inputs = body.data_inputs(link)
        if link.op == "Squeeze" and not ops and _keeps_last(link, rank):
            current = head = link
            rank -= len(link.attr["squeeze_dims"].list.i)
            continue
        if link.op in FUSED_BATCH_NORMS:  # tf-keras's and tf.nn.fused_batch_norm's, in inference
            affine = _fused_batch_norm(body, link, position, kernel_op, channels, read)
            if affine is None:
                break
            scale, shift = scale * affine[0], shift * affine[0] + affine[1]
            current, last = link, link.name
            ops.append(link.op)
            continue
        if link.op not in CHAIN_OPS or len(inputs) != 2 or link.attr["T"].type != kernel_op.attr["T"].type:
            break
        if link.op == "BiasAdd" and ("data_format" in link.attr and link.attr["data_format"].s not in (b"", b"NHWC")
                                     or position != 0):
            break
        operand = _per_channel(body, inputs[1 - position], channels, read)
        if operand is None:
            break
        if link.op == "Mul":
            scale, shift = scale * operand, shift * operand
        elif link.op == "RealDiv" and position == 0 and np.all(operand != 0):
            scale, shift = scale / operand, shift / operand
        elif link.op in ("Add", "AddV2", "BiasAdd"):
            shift = shift + operand
        elif link.op == "Sub":
            scale, shift = (scale, shift - operand) if position == 0 else (-scale, operand - shift)
        else:
            break
        current, last = link, link.name
        ops.append(link.op)
    if last is None or not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None
    return last, scale, shift, ops, head.name


def _keeps_last(squeeze, rank: int) -> bool:
    """A Squeeze of named axes, none of them the last of a tensor of rank ``rank``."""
    dims = [d + rank if d < 0 else d for d in squeeze.attr["squeeze_dims"].list.i]
    return rank > 1 and bool(dims) and all(0 <= d < rank - 1 for d in dims)


def _fused_batch_norm(body: b.Body, link, position: int, kernel_op, channels: int, read):
    """(scale, shift) per channel of a FusedBatchNorm(V2/V3) in inference (is_training false,
    channels last) that reads the chain as its input and whose scale, offset, mean and variance
    are computed from constants (and the variables ``read`` gives), when only its output y is
    read; else None."""
    layout = link.attr["data_format"].s.decode() if "data_format" in link.attr else ""
    inputs = body.data_inputs(link)
    if position != 0 or len(inputs) != 5 or link.attr["is_training"].b or layout not in ("", "NHWC", "NDHWC") or \
            link.attr["T"].type != kernel_op.attr["T"].type:
        return None
    if any(body.parse(reader.input[at])[1] != 0 for reader, at in body.consumers(link.name)
           if not reader.input[at].startswith("^")):
        return None  # its batch statistics (outputs 1-5) are read: not an inference batch norm
    gamma, beta, mean, variance = (_per_channel(body, ref, channels, read) for ref in inputs[1:])
    if gamma is None or beta is None or mean is None or variance is None:
        return None
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(variance + np.float64(np.float32(link.attr["epsilon"].f)))
    return scale, beta - mean * scale


def sole_reader(body: b.Body, node, returned: set):
    """(reader, input position) of the one op that reads ``node``, as data, when nothing else
    does (no control reader either) and the body does not return it; else None."""
    consumers = body.consumers(node.name)
    if len(consumers) != 1 or node.name in returned or consumers[0][0].input[consumers[0][1]].startswith("^"):
        return None
    return consumers[0]


def _per_channel(body: b.Body, ref: str, channels: int, read=lambda key: None) -> np.ndarray | None:
    """The operand as one float64 value per output channel, when it is computed from constants
    (and the variables ``read`` gives) alone and is a scalar or varies along the last axis only;
    else None."""
    value = _evaluate(body, ref, 0, read)
    if value is None or value.dtype.kind != "f":
        return None
    if value.ndim > 4 or value.ndim and (any(d != 1 for d in value.shape[:-1]) or value.shape[-1] not in (1, channels)):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def _evaluate(body: b.Body, ref: str, depth: int, read=lambda key: None) -> np.ndarray | None:
    """The value of a small tensor computed from constants (and the variables ``read`` gives)
    alone (NumPy), or None."""
    node = body.producer(ref)
    if node is None or depth > 16 or body.parse(ref)[1] != 0:
        return None
    if node.op == "Const":
        shape = [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
        return tf.make_ndarray(node.attr["value"].tensor) if np.prod(shape) <= MAX_OPERAND_ELEMENTS else None
    key = body.read_key(node)
    if key is not None:
        value = read(key)
        return None if value is None else np.asarray(value)
    parts = [_evaluate(body, raw, depth + 1, read) for raw in body.data_inputs(node)]
    if any(part is None for part in parts) or not parts:
        return None
    unary = {"Identity": lambda x: x, "Snapshot": lambda x: x, "Neg": np.negative, "Sqrt": np.sqrt,
             "Rsqrt": lambda x: 1 / np.sqrt(x), "Reciprocal": lambda x: 1 / x, "Square": np.square}
    binary = {"Mul": np.multiply, "Add": np.add, "AddV2": np.add, "Sub": np.subtract, "RealDiv": np.divide,
              "Maximum": np.maximum, "Minimum": np.minimum}
    with np.errstate(all="ignore"):
        if node.op in unary and len(parts) == 1:
            return np.asarray(unary[node.op](parts[0]), parts[0].dtype)
        if node.op in binary and len(parts) == 2:
            return np.asarray(binary[node.op](parts[0], parts[1]), np.result_type(parts[0], parts[1]))
        if node.op == "Cast":
            return parts[0].astype(tf.dtypes.as_dtype(node.attr["DstT"].type).as_numpy_dtype)
        try:
            if node.op == "Reshape" and len(parts) == 2:
                return parts[0].reshape(parts[1].astype(np.int64))
            if node.op == "ExpandDims" and len(parts) == 2:
                return np.expand_dims(parts[0], int(parts[1]))
            if node.op == "Squeeze" and len(parts) == 1:
                axes = tuple(node.attr["squeeze_dims"].list.i)
                return np.squeeze(parts[0], axis=axes or None)
        except (ValueError, TypeError):
            return None
    return None


register_pass("fold_batch_norms", fold_batch_norms, options=[
    Option("variables", "bool", False, "fold scales and shifts read from variables the model never writes too "
           "(their values now: they stop being trainable there); unset: constants only"),
], invalidates=("weights", "channel_groups"))
