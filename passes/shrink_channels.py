"""shrink_channels: remove dead channels from the graph, so the model is smaller and faster.

Precondition: a finalized model (masks folded: removed channels hold zeros). For every prunable
channel group (graphprune.channels), a channel is dead when every kernel that consumes it (a
conv's input channel, a dense layer's row, rows of a flattened input) holds zeros there: nothing
the model computes depends on it. Query/key head dims, which no kernel reads (their product only
feeds softmaxes: ChannelGroup.contracted), are dead when the kernels that make them hold zeros
(and those that read them, if any). Dead channels are removed from every member of the group:
kernels (input and output axes), depthwise kernels, biases, normalization parameters and
statistics, constants, concatenated slices; Reshape shapes that name the channel count follow,
and so do the count of copies tf.repeat makes (the query heads that share a key/value head) and
the heads in a batch * heads that sizes the batch merged with heads (ViTDet's attention).
Where such a product is also read by more than softmaxes (relative position tables), insert_masks
zeroed the removed channels of one operand (names.kept_product); once none is left, that Mul goes.
Variables get new values and shapes; constants are rewritten in place, and a tf.range of
constant bounds (rotary inverse frequencies) becomes a gather of its kept values, as does a Tile
of a table made from constants and shapes (DINOv3's rotary angles: channels.TableSite). A group whose every
channel is dead keeps one (a tensor of zero channels is not a model). Groups left whole by the
analysis are not touched and are listed in the report with the reason. Ops no output needs are
removed first (strip_unused): the analysis does not read them, so they would keep the old sizes.

Postcondition: the outputs equal the input model's (the removed channels multiplied zeros) and
every shape is consistent; finalize's check runs both models and refuses a difference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2, types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune import names
from graphprune.channels import CONTROL_FLOW_OPS, analyze, contracted_axes, rounding
from graphprune.passbase import Option, PassContext, PassResult, register_pass
from graphprune.passes.strip_unused import strip_unused


# ops whose shape operand (channels.ShapeDim.operand) may spell out a channel count to rewrite
SHAPED_OPS = ("Reshape", "Fill", "Tile", "BroadcastTo", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
              "TensorListFromTensor", "TensorListReserve", "TensorListGetItem", "TensorListStack")


def shrink_channels(model: g.TracedModel, context: PassContext, round_to: int = 1) -> PassResult:
    """Remove every dead channel of every prunable group (see the module docstring). ``round_to``
    keeps a multiple of that many channels per group (dead channels kept back in index order),
    for kernels that run faster on such counts."""
    # Ops no output needs are not analysed (channels._Entry): left in, they would read the shrunk
    # tensors with the sizes they had (a Keras layer's dropped key/value cache stacks keys and values)
    stripped = strip_unused(model, context)
    model = stripped.model
    analysis = analyze(model)
    consts = _const_values(model)

    def value(kind: str, name: str) -> np.ndarray:
        return np.asarray(context.value(model, name) if kind == "variable" else consts[name])

    def shape_of(member) -> tuple:  # without reading the weight
        return tuple(model.variables[member.name].shape) if member.kind == "variable" else consts[member.name].shape

    contracted = contracted_axes(analysis.groups)
    removed: dict[str, np.ndarray] = {}  # group name -> dead channel indices
    removal: dict[tuple[str, str, int], set] = {}
    report_groups = {}
    for group in analysis.groups:
        if not group.prunable:
            continue
        # kernels that read the channels, and the kept-channel vectors of means over them
        consumers = [m for m in group.members if m.role == "in" or
                     "keep_max" in (names.kept_mean_part(m.name), names.kept_product_part(m.name)) or
                     (group.contracted and m.role in ("out", "through"))]
        alive = np.zeros(group.size, bool)
        for member in consumers:
            array = value(member.kind, member.name)
            moved = np.moveaxis(array, member.axis, 0).reshape(array.shape[member.axis], -1)
            used = np.any(moved != 0, axis=1)
            if member.block is not None:
                used = used.reshape(-1, member.block).any(axis=1)
            if member.period is not None:
                used = used.reshape(-1, member.period).any(axis=0)
            alive |= used[member.start:member.stop]
        dead = np.flatnonzero(~alive)
        keep_count = group.size - len(dead)
        multiple = int(rounding(group, round_to, shape_of, contracted))
        wanted = min(group.size, max(1, -(-keep_count // multiple) * multiple))
        if wanted > keep_count:
            dead = dead[wanted - keep_count:]
        if not len(dead):
            continue
        removed[group.name] = dead
        report_groups[group.name] = f"{group.size} -> {group.size - len(dead)}"
        for member in group.members:
            dim = value(member.kind, member.name).shape[member.axis]
            removal.setdefault((member.kind, member.name, member.axis), set()).update(
                member.indices(dim, dead).tolist())
    if not removal:
        return PassResult(model, changed=stripped.changed, report={"shrunk": {}, "left_whole": _whole(analysis)})

    sliced: dict[tuple[str, str], np.ndarray] = {}
    for (kind, name, axis), indices in sorted(removal.items()):
        array = sliced[(kind, name)] if (kind, name) in sliced else value(kind, name)
        sliced[(kind, name)] = np.delete(array, sorted(indices), axis=axis)
    specs = []
    for (kind, name), array in sliced.items():
        if kind == "variable":
            spec = model.variables[name]
            specs.append(dataclasses.replace(spec, shape=tuple(array.shape), value=array))
    new_shapes = _reshape_targets(analysis, removed)
    new_dims = _dim_targets(analysis, removed)
    new_splits = _split_targets(analysis, removed)
    new_bounds = _slice_targets(analysis, removed)
    squeezes = {(entry, node): axes for entry, node, axes in analysis.squeezes}
    # (entry, scalar node) -> its new value, where the axis it sizes is shrunk: a Tile's count of
    # copies becomes the kept count (Analysis.counts); a size read as a number keeps the size it
    # had (Analysis.numbers)
    scalars = {}
    for label, count_node, space in analysis.counts:
        kept = _kept_size(analysis, removed, space)
        if space in analysis.sizes and kept != analysis.sizes[space]:
            scalars[(label, count_node)] = kept
    for label, number_node, space in analysis.numbers:
        if space in analysis.sizes and _kept_size(analysis, removed, space) != analysis.sizes[space]:
            scalars[(label, number_node)] = analysis.sizes[space]
    scales = {}  # (entry, Mul) -> (operand, the kept count of heads merged with the batch)
    for site in analysis.scales:
        kept = _kept_size(analysis, removed, site.space)
        if kept != analysis.sizes[site.space]:
            scales[(site.entry, site.node)] = (site.operand, kept)
    tables = {}  # (entry, Tile) -> [(axis, kept channels)]: a table's copies gathered (channels.TableSite)
    for site in analysis.tables:
        kept = _kept_indices(analysis, removed, site.space)
        if len(kept) != analysis.sizes[site.space]:
            tables.setdefault((site.entry, site.node), []).append((site.axis, kept))
    entries = []
    shrunk_specs = {spec.key: spec for spec in specs}
    for entry in model.entries:
        def rewrite(body, entry=entry):
            for node in list(body.nodes):
                name = body.use_name(node)
                key = f"{entry.label}/{name}"
                if node.op == "Const" and ("const", key) in sliced:
                    body.replace(node, g.const_node(node.name, sliced[("const", key)],
                                                    tf.dtypes.as_dtype(node.attr["dtype"].type).name))
                elif node.op == "Range" and ("const", key) in sliced:
                    _gather_kept(body, node, np.delete(np.arange(len(consts[key])), sorted(removal[("const", key, 0)])))
                elif node.op in ("Reshape", "BroadcastTo", "Slice") and (entry.label, name) in new_shapes:
                    _set_last_dim(body, node, *new_shapes[(entry.label, name)])
                    if (entry.label, name) in new_dims:  # a BroadcastTo's other elements too
                        _set_dims(body, node, *new_dims[(entry.label, name)])
                elif node.op in SHAPED_OPS and (entry.label, name) in new_dims:
                    _set_dims(body, node, *new_dims[(entry.label, name)])
                elif node.op in ("Split", "SplitV") and (entry.label, name) in new_splits:
                    _set_split_sizes(body, node, new_splits[(entry.label, name)])
                elif node.op in ("StridedSlice", "Slice") and (entry.label, name) in new_bounds:
                    _set_bounds(body, node, *new_bounds[(entry.label, name)])
                    if (entry.label, name) in new_shapes:  # a Slice's size, of a last axis taken whole
                        _set_last_dim(body, node, *new_shapes[(entry.label, name)])
                elif node.op == "Mul" and (entry.label, name) in scales:  # batch * heads (channels.ScaleSite)
                    operand, kept = scales[(entry.label, name)]
                    factor = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_heads"), np.array(kept),
                                                   _output_dtype(node)))
                    body.set_input(node, operand, body.ref(factor.name))
                elif (entry.label, name) in scalars:  # a Tile's count of copies, or a size read as a number
                    body.replace(node, g.const_node(node.name, np.array(scalars[(entry.label, name)]),
                                                    _output_dtype(node)))
                elif node.op == "Squeeze" and (entry.label, name) in squeezes and \
                        not node.attr["squeeze_dims"].list.i:  # the same axes, once a channel axis is 1 too
                    node.attr["squeeze_dims"].list.i.extend(squeezes[(entry.label, name)])
                    body.mark_changed()
                for axis, kept in tables.get((entry.label, name), ()):  # after any rewrite of its multiples
                    _gather_kept(body, body.node(node.name), kept, axis, dtype_attr="T")
            _update_shapes(body, entry.label, analysis, removed, shrunk_specs)
            _plain_means(body)
            _plain_products(body)

        entries.append(b.rewrite_entry(entry, rewrite)[0])
    new_model = dataclasses.replace(model.with_variables(specs), entries=tuple(entries))
    report = {"shrunk": report_groups, "left_whole": _whole(analysis),
              "removed_parameters": int(sum(value(k, n).size - a.size for (k, n), a in sliced.items()))}
    return PassResult(new_model, changed=True, report=report)


def _plain_means(body: b.Body) -> None:
    """A mean over kept channels (insert_masks: a layer norm's) whose channels are all kept
    now, Sum(x * 1) / Sum(1), becomes the Mean it was (the rest is left to strip_unused)."""
    for node in list(body.nodes):
        keep = body.node(names.kept_mean(node.name, "keep_max"))
        if node.op != "RealDiv" or keep is None or keep.op != "Const":
            continue
        if not np.all(tf.make_ndarray(keep.attr["value"].tensor) == 1):
            continue  # round_to kept some removed channels back: they must not count
        total = body.node(names.kept_mean(node.name, "sum"))
        kept = body.node(names.kept_mean(node.name, "kept"))
        mean = g.make_node(node.name, "Mean", [kept.input[0], total.input[1]], T=tf.dtypes.as_dtype(node.attr["T"].type),
                           Tidx=tf.dtypes.as_dtype(total.attr["Tidx"].type), keep_dims=bool(total.attr["keep_dims"].b))
        mean.input.extend(i for i in node.input if i.startswith("^"))
        body.replace(node, mean)


def _plain_products(body: b.Body) -> None:
    """A product's operand times its kept channels (insert_masks: names.kept_product) whose
    channels are all kept now becomes the operand (the rest is left to strip_unused)."""
    for node in list(body.nodes):
        if names.kept_product_part(node.name) != "apply":
            continue
        keep = body.node(node.name.rsplit("/", 1)[0] + "/keep_max")
        if keep is None or keep.op != "Const" or not np.all(tf.make_ndarray(keep.attr["value"].tensor) == 1):
            continue  # round_to kept some removed channels back: they must still add zero
        body.repoint(body.ref(node.name), body.data_inputs(node)[0])


def _update_shapes(body: b.Body, entry: str, analysis, removed: dict, specs: dict) -> None:
    """Shapes recorded for TensorFlow's shape inference where channels go: the outputs of loops
    and branches, a function's input shapes (which TensorFlow uses when it loads the function),
    and the shape of a resource argument of a shrunk variable."""
    def resize(shape, name: str, index: int) -> None:
        for axis, dim in enumerate(shape.dim):
            space = ("t", entry, name, index, axis)
            if dim.size >= 0 and space in analysis.sizes:
                kept = _kept_size(analysis, removed, space)
                if kept != dim.size:
                    dim.size = kept
                    body.mark_changed()

    for node in body.nodes:
        if node.op in CONTROL_FLOW_OPS:
            for attr in ("output_shapes", "_output_shapes"):
                if attr in node.attr:
                    for index, shape in enumerate(node.attr[attr].list.shape):
                        resize(shape, body.use_name(node), index)
    if not body.is_function:
        return
    arguments = body.proto.signature.input_arg
    if "_input_shapes" in body.proto.attr:
        for arg, shape in zip(arguments, body.proto.attr["_input_shapes"].list.shape):
            resize(shape, body.path_name(arg.name), 0)
    for position, attrs in body.proto.arg_attr.items():
        if "_output_shapes" in attrs.attr and position < len(arguments):
            for shape in attrs.attr["_output_shapes"].list.shape:
                resize(shape, body.path_name(arguments[position].name), 0)
    for arg in arguments:
        spec = specs.get(body.resources.get(arg.name))
        if arg.type == types_pb2.DT_RESOURCE and spec is not None:
            del arg.handle_data[:]
            b.set_handle_data(arg, spec)
            body.mark_changed()


def _whole(analysis) -> dict[str, str]:
    return {group.name: group.reason for group in analysis.groups if not group.prunable}


def _const_values(model: g.TracedModel) -> dict[str, np.ndarray]:
    """Constants by "entry label/node" (the node's body path before its name), each read when
    first asked for; a Range of constant bounds (channels._range) by its values."""
    nodes = {}
    for entry in model.entries:
        def collect(body, entry=entry):
            nodes.update((f"{entry.label}/{body.use_name(n)}", (n, body)) for n in body.nodes
                         if n.op in ("Const", "Range"))

        b.visit_entry(entry, collect)

    class Lazy(dict):
        def __missing__(self, key):
            node, body = nodes[key]
            if node.op == "Range":
                self[key] = _range_values(body, node)
            else:
                self[key] = tf.make_ndarray(node.attr["value"].tensor)
            return self[key]

    return Lazy()


def _reshape_targets(analysis, removed: dict) -> dict[tuple[str, str], tuple[int, int]]:
    """(entry, Reshape node) -> (the new last dimension of its output, the shape operand's
    position), for reshapes of shrunk tensors (and BroadcastTo, Slice: channels.Reshape)."""
    targets = {}
    for reshape in analysis.reshapes:
        kept = _kept_size(analysis, removed, reshape.space)
        if kept != analysis.sizes.get(reshape.space, 0):
            targets[(reshape.entry, reshape.node)] = (kept * reshape.repeats, reshape.operand)
    return targets


def _kept_size(analysis, removed: dict, space) -> int:
    """How many channels of ``space`` are left once the groups' ``removed`` channels are gone."""
    return _kept_before(analysis, removed, space, analysis.sizes.get(space, 0))


def _dim_targets(analysis, removed: dict) -> dict[tuple[str, str], tuple[dict[int, int], int]]:
    """(entry, Reshape or Fill node) -> ({position: new value} of its constant shape operand, the
    operand), where two axes are merged or split or a constant shape keeps an axis (channels.ShapeDim)."""
    targets: dict[tuple[str, str], tuple[dict[int, int], int]] = {}
    for dim in analysis.dims:
        if any(space not in analysis.sizes for space in dim.spaces):
            continue  # a dimension not known statically (the batch): never a channel axis
        kept = [_kept_size(analysis, removed, space) for space in dim.spaces]
        if kept != [analysis.sizes[space] for space in dim.spaces]:
            targets.setdefault((dim.entry, dim.node), ({}, dim.operand, dim.static))[0][dim.position] = \
                int(np.prod(kept))
    return targets


def _gather_kept(body: b.Body, node, kept: np.ndarray, axis: int = 0, dtype_attr: str = "Tidx") -> None:
    """``node`` (of one output, of type attr ``dtype_attr``) becomes the elements at ``kept`` along
    ``axis`` of what it made, under its name: a Range of constant bounds (rotary inverse
    frequencies: no float constant added to the model's parameters) or a table's Tile (TableSite)."""
    whole = node_def_pb2.NodeDef()
    whole.CopyFrom(node)
    whole.name = body.fresh(f"{node.name}/whole")
    body.add(whole)
    indices = body.add(g.const_node(body.fresh(f"{node.name}/kept"), kept.astype(np.int32), "int32"))
    axis = body.add(g.const_node(body.fresh(f"{node.name}/axis"), np.array(axis, np.int32), "int32"))
    gather = g.make_node(node.name, "GatherV2", [body.ref(whole.name), body.ref(indices.name), body.ref(axis.name)],
                         Tparams=tf.dtypes.as_dtype(node.attr[dtype_attr].type), Tindices=tf.int32, Taxis=tf.int32)
    body.replace(node, gather)


def _range_values(body: b.Body, node) -> np.ndarray:
    """The values of a Range whose bounds are constants (behind Identity or Cast)."""
    bounds = []
    for ref in body.data_inputs(node)[:3]:
        producer, casts = body.producer(ref), []
        while producer.op in ("Identity", "Cast", "Snapshot"):
            if producer.op == "Cast":
                casts.append(tf.dtypes.as_dtype(producer.attr["DstT"].type).as_numpy_dtype)
            producer = body.producer(body.data_inputs(producer)[0])
        value = tf.make_ndarray(producer.attr["value"].tensor)
        for dtype in reversed(casts):  # the innermost first
            value = value.astype(dtype)
        bounds.append(value)
    return np.arange(*bounds).astype(tf.dtypes.as_dtype(node.attr["Tidx"].type).as_numpy_dtype)


def _output_dtype(node) -> str:
    """The dtype of a single-output node's output: a Const's, a Cast's, or its T."""
    attr = {"Const": "dtype", "Cast": "DstT"}.get(node.op, "T")
    return tf.dtypes.as_dtype(node.attr[attr].type).name


def _split_targets(analysis, removed: dict) -> dict[tuple[str, str], list[int]]:
    """(entry, Split or SplitV node along channels) -> its parts' kept sizes (channels.SplitSite)."""
    targets = {}
    for site in analysis.splits:
        kept = [_kept_size(analysis, removed, space) for space in site.spaces]
        if kept != [analysis.sizes.get(space, 0) for space in site.spaces]:
            targets[(site.entry, site.node)] = kept
    return targets


def _kept_indices(analysis, removed: dict, space) -> np.ndarray:
    """The channels of ``space`` left once the groups' ``removed`` channels are gone, in order."""
    if space in analysis.refined:  # split into heads: the kept dims of every kept head
        heads, dims = analysis.refined[space]
        inner = _kept_indices(analysis, removed, dims)
        return (_kept_indices(analysis, removed, heads)[:, None] * analysis.sizes[dims] + inner[None, :]).ravel()
    gone = np.zeros(analysis.sizes[space], bool)
    for start, _, name in analysis.slices.get(space, []):
        gone[np.asarray(removed.get(name, ()), int) + start] = True
    return np.flatnonzero(~gone)


def _kept_before(analysis, removed: dict, space, position: int) -> int:
    """How many of the channels [0, position) of ``space`` are left once the groups' ``removed``
    channels are gone (``position`` is a bound of its groups' slices: a SliceSite's link cuts there)."""
    if space in analysis.refined:  # split into heads: whole heads before the position
        heads, dims = analysis.refined[space]
        period = analysis.sizes[dims]
        return _kept_before(analysis, removed, heads, position // period) * _kept_size(analysis, removed, dims)
    gone = sum(int(np.sum(np.asarray(removed.get(name, ()), int) + start < position))
               for start, _, name in analysis.slices.get(space, []))
    return position - gone


def _slice_targets(analysis, removed: dict) -> dict[tuple[str, str], tuple]:
    """(entry, StridedSlice or Slice node of a part of a channel axis) -> (the site, the new
    start, the new stop) (channels.SliceSite)."""
    targets = {}
    for site in analysis.slice_sites:
        bounds = [_kept_before(analysis, removed, site.space, p) for p in (site.start, site.stop)]
        if bounds != [site.start, site.stop]:
            targets[(site.entry, site.node)] = (site, *bounds)
    return targets


def _set_bounds(body: b.Body, node, site, start: int, stop: int) -> None:
    """Point a StridedSlice's begin and end operands (a Slice's begin and size) at copies whose
    element ``site.index`` is ``start`` and ``stop`` (the size ``stop - start``; an end or size
    that is masked or -1, to the axis's end, stays so)."""
    dtype = tf.dtypes.as_dtype(node.attr["Index"].type).name
    for operand, new in ((1, start), (2, stop if node.op == "StridedSlice" else stop - start)):
        value = np.array(site.operands[operand - 1]).reshape(-1)
        masked = node.op == "StridedSlice" and node.attr["begin_mask" if operand == 1 else "end_mask"].i & 1 << site.index
        if masked or (node.op == "Slice" and operand == 2 and value[site.index] == -1):
            continue
        value[site.index] = new
        const = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_bounds"), value, dtype))
        body.set_input(node, operand, body.ref(const.name))


def _set_split_sizes(body: b.Body, node, sizes: list[int]) -> None:
    """Make a Split or SplitV node (same name, same outputs) a SplitV into parts of ``sizes``."""
    if node.op == "Split":
        axis_ref, value_ref = body.data_inputs(node)
    else:
        value_ref, _, axis_ref = body.data_inputs(node)
    parts = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_sizes"), np.array(sizes, np.int32), "int32"))
    split = node_def_pb2.NodeDef(name=node.name, op="SplitV", device=node.device)
    controls = [raw for raw in node.input if raw.startswith("^")]
    split.input.extend([value_ref, body.ref(parts.name), axis_ref] + controls)
    for attr in ("T", "num_split"):
        split.attr[attr].CopyFrom(node.attr[attr])
    split.attr["Tlen"].type = types_pb2.DT_INT32
    body.replace(node, split)


def _set_dims(body: b.Body, node, values: dict[int, int], operand: int = 1, static: tuple | None = None) -> None:
    """Point a Reshape's (or Fill's) constant shape operand (or a Tile's multiples: the input at ``operand``) at a copy with
    ``values`` at their positions (an element that is -1 stays -1: TensorFlow infers it). ``static``:
    the operand's value where it is computed from constants (channels.ShapeDim.static): a Const
    holding it, with the new values, takes its place."""
    producer = body.producer(body.data_inputs(node)[operand])
    if producer.op == "Pack":  # of scalars: those at the positions (Consts, or computed sizes) are replaced
        inputs = body.data_inputs(producer)
        values = {p % len(inputs): value for p, value in values.items()}
        elements = {p: body.producer(inputs[p]) for p in values}
        olds = {p: int(tf.make_ndarray(e.attr["value"].tensor)) if e is not None and e.op == "Const" else None
                for p, e in elements.items()}  # None: computed (or a function argument), rewritten
        positions = [p for p in values if olds[p] != -1 and olds[p] != values[p]]
        if not positions:
            return
        shape = type(producer)()
        shape.CopyFrom(producer)
        shape.name = body.fresh(f"{node.name}/shrunk_shape")
        dtype = tf.dtypes.as_dtype(producer.attr["T"].type).name
        for p in positions:
            element = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_shape_{p}"), np.array(values[p]), dtype))
            shape.input[p] = body.ref(element.name)
        body.set_input(node, operand, body.ref(body.add(shape).name))
        return
    if producer.op == "Const":
        shape = tf.make_ndarray(producer.attr["value"].tensor).copy()
        dtype = tf.dtypes.as_dtype(producer.attr["dtype"].type).name
    else:  # computed from constants: a Const of its value takes its place
        dtype = tf.dtypes.as_dtype(node.attr["Tshape"].type).name if "Tshape" in node.attr else "int32"
        shape = np.array(static, dtype)
    positions = [position for position in values if shape[position] != -1]
    if not positions:
        return
    for position in positions:
        shape[position] = values[position]
    new = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_shape"), shape, dtype))
    body.set_input(node, operand, body.ref(new.name))


def _set_last_dim(body: b.Body, node, last: int, operand: int = 1) -> None:
    """Point a Reshape's shape operand (the input at ``operand``) at a copy whose last element is
    ``last`` (unless it is -1)."""
    shape_ref = body.data_inputs(node)[operand]
    producer = body.producer(shape_ref)
    if producer.op in ("Const", "Pack"):  # a Pack's last element is a Const scalar
        _set_dims(body, node, {-1: last}, operand)
        return
    # a ConcatV2 whose last part is a Const vector
    position = len(body.data_inputs(producer)) - 2
    part = body.producer(body.data_inputs(producer)[position])
    value = tf.make_ndarray(part.attr["value"].tensor).copy()
    if int(np.ravel(value)[-1]) == -1:
        return
    value.reshape(-1)[-1] = last
    dtype = tf.dtypes.as_dtype(part.attr["dtype"].type)
    new_part = body.add(g.const_node(body.fresh(f"{node.name}/shrunk_last"), value, dtype.name))
    shape = type(producer)()
    shape.CopyFrom(producer)
    shape.name = body.fresh(f"{node.name}/shrunk_shape")
    shape.input[position] = body.ref(new_part.name)
    body.set_input(node, operand, body.ref(body.add(shape).name))


register_pass("shrink_channels", shrink_channels, options=[
    Option("round_to", "int", 1, "keep a multiple of this many channels (values: a head spans head_dim) per group"),
], invalidates=("weights", "channel_groups"))
