"""insert_masks: a mask variable per weight, multiplied in front of every read of that weight.

Matches every ReadVariableOp of a weight recorded by find_weights (runs it if needed), in every
body of every entry. Rewrites:

    before:  Placeholder(w) -> ReadVariableOp -> MatMul           (and ResourceGather(w, ids))
    after:   Placeholder(w) -> ReadVariableOp -----------------------------------> Mul '<w>/graphprune/masked' -> MatMul
             Placeholder('<w>/graphprune/mask/resource') -> ReadVariableOp '<w>/graphprune/mask/read'
                 -> Cast '<w>/graphprune/mask/cast' (uint8 -> the weight's dtype) ----/

An embedding lookup of a masked weight (ResourceGather) becomes GatherV2(w * mask, ids), so a
tied embedding is masked once for both of its uses. One non-trainable uint8 (0/1) mask variable
``<w>/graphprune/mask`` per weight (shared by all its uses and entries; one byte per element, see
masks.mask_dtype), initialised to ones, or with ``sparsity=`` to the magnitude mask of the weight's current
value (one-shot pruning). Weights that are already masked are left alone, so a re-run is a no-op.
Every body is rewritten the same way, at any depth: inside a While/If/Case body or a called
function, the mask's resource is threaded in through every caller (a loop variable the body
passes through, a branch input, a call argument) and the Mul happens where the weight is read.
With the channel structure, each Mean over channels it may remove (a layer norm's mean and
variance; over a residual stream only with ``residual_stream``) becomes Sum(x * keep) / Sum(keep)
under the Mean's name, keep being the 0/1 channels (the maximum over the other axes of the mask
of a kernel whose axis holds the same channels): the masked model then normalizes over the kept
channels, as the shrunk model will.
Likewise each product of two activations over channels it may remove that is read by more than
softmaxes (channels.ProductSite: a table of relative positions times the queries, rotated queries
with a bias) gets one operand multiplied by those channels' 0/1 vector (names.kept_product), so a
removed channel adds exactly zero to it, as it adds nothing once removed.
fold_masks freezes keep; shrink_channels slices it and turns an all-ones one back into the Mean
(and drops the product's Mul).
Postcondition: every use of a masked weight reads ``w * mask``; with all-ones masks the model
computes exactly what it computed before.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune import names
from graphprune.analysis import weights_of
from graphprune.config import PruningConfig, make_config
from graphprune.errors import PassError
from graphprune.masks import mask_dtype
from graphprune.names import mask_key
from graphprune.passbase import CONFIG_OPTIONS, Option, PassContext, PassResult, register_pass
from graphprune.schedules import ConstantSparsity
from graphprune.update import compute_masks


def config_from_options(config: PruningConfig | None, sparsity, options: dict) -> PruningConfig:
    """The pass's PruningConfig: the one given, or one built from flat text-pipeline options."""
    if config is not None:
        if sparsity is not None:
            return dataclasses.replace(config, schedule=config.schedule.with_final_sparsity(sparsity))
        return config
    accepted = set(inspect.signature(make_config).parameters) - {"schedule"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PassError(f"insert_masks has no option '{unknown[0]}' (its options: sparsity, config, "
                        f"{', '.join(sorted(accepted))})")
    return make_config(ConstantSparsity(sparsity if sparsity is not None else 0.0, 0, 0, 1), **options)


def insert_masks(model: g.TracedModel, context: PassContext, sparsity=None, final_sparsity=None, config=None,
                 **options) -> PassResult:
    """Add a mask variable per weight and Mul(read(w), read(mask)) in front of every use."""
    sparsity = final_sparsity if sparsity is None else sparsity
    config = config_from_options(config, sparsity, options)
    weights = weights_of(model)
    plans, skipped = config.plan(w for w in weights if w.mask is None)
    to_mask = [w for w in weights if w.key in plans]
    if not to_mask:
        return PassResult(model.with_facts(weights=weights), changed=False,
                          report={"masked": [], "skipped": skipped})

    dtype = mask_dtype()
    initial = _initial_masks(model, context, to_mask, plans, sparsity, dtype)
    specs = [
        g.VariableSpec(key=mask_key(w.key), shape=w.shape, dtype=dtype, role=g.ROLE_MASK, trainable=False,
                       initial=initial[w.key], weight=w.key)
        for w in to_mask
    ]
    keys = {w.key for w in to_mask}
    new_variables = model.with_variables(specs).variables
    means, products = _channel_sites(model, plans, keys)

    def rewrite(body, entry_name):
        _mask_body(body, keys, new_variables)
        if not body.is_function:
            for site in means.get(entry_name, ()):
                _kept_mean(body, *site)
            for site in products.get(entry_name, ()):
                _kept_product(body, *site)

    entries = tuple(entry if entry.kind == "update" else
                    b.rewrite_entry(entry, lambda body, name=entry.label: rewrite(body, name),
                                    variables=new_variables)[0] for entry in model.entries)
    new_model = dataclasses.replace(model, entries=entries).with_variables(specs)
    masked = tuple(dataclasses.replace(w, mask=mask_key(w.key)) if w.key in keys else w for w in weights)
    report = {"masked": sorted(keys), "skipped": skipped, "kept_means": sum(len(v) for v in means.values()),
              "kept_products": sum(len(v) for v in products.values()),
              "initial_sparsity": {k: float(1 - np.mean(v)) for k, v in initial.items()}}
    return PassResult(new_model.with_facts(weights=masked), changed=True, report=report)


def _initial_masks(model, context, weights, plans, sparsity, dtype) -> dict[str, np.ndarray]:
    if sparsity is None:
        # Broadcast views of one 1: no mask-sized array until the variable is made (in TensorFlow).
        ones = np.ones((), tf.dtypes.as_dtype(dtype).as_numpy_dtype)
        return {w.key: np.broadcast_to(ones, w.shape) for w in weights}
    values = {w.key: tf.constant(context.value(model, w.key)) for w in weights}
    # One-shot: each weight goes to its plan's final sparsity (own-sparsity rules included).
    targets = {w.key: tf.constant(plans[w.key].schedule.final_sparsity, tf.float32) for w in weights}
    computed = compute_masks(values, plans, targets, {w.key: w.input_axis for w in weights})
    return {key: tf.cast(mask, dtype).numpy() for key, (mask, _) in computed.items()}


def _mask_body(body: b.Body, keys: set[str], variables) -> None:
    """Mask every read (and ResourceGather lookup) of a weight in ``keys`` in one body; the mask's
    resource is the body's own (a placeholder at the top, an argument threaded in elsewhere)."""
    reads: dict[str, list] = {}
    gathers: dict[str, list] = {}
    for node in list(body.nodes):
        if node.op == "ReadVariableOp":
            key = body.read_key(node)
            if key in keys:
                reads.setdefault(key, []).append(node)
        elif node.op == "ResourceGather" and node.attr["batch_dims"].i == 0:
            key = body.resource_key(node.input[0])
            if key in keys:
                gathers.setdefault(key, []).append(node)
    for key, gather_nodes in gathers.items():
        if key not in reads:  # a weight only looked up (embedding): read it, so it can be masked
            read = g.make_node(f"{names.node_scope(key)}/read", "ReadVariableOp", [gather_nodes[0].input[0]],
                               dtype=tf.dtypes.as_dtype(variables[key].dtype))
            reads[key] = [body.add(read)]
    for key, read_nodes in sorted(reads.items()):
        dtype = tf.dtypes.as_dtype(variables[key].dtype)
        resource = body.resource(names.mask_key(key), names.mask_placeholder(key))
        stored = tf.dtypes.as_dtype(variables[names.mask_key(key)].dtype)
        mask = body.add(g.make_node(names.mask_read_node(key), "ReadVariableOp", [resource], dtype=stored))
        if stored != dtype:  # an integer mask, read as the weight's 0/1
            mask = body.add(g.make_node(names.mask_cast_node(key), "Cast", [body.ref(mask.name)], SrcT=stored,
                                        DstT=dtype, Truncate=False))
        for number, read in enumerate(sorted(read_nodes, key=lambda n: n.name)):
            masked = names.masked_node(key, number)
            value = body.ref(read.name)
            body.add(g.make_node(masked, "Mul", [value, body.ref(mask.name)], T=dtype))
            body.repoint(value, body.ref(masked), exclude=(masked,))
        for gather in gathers.get(key, ()):
            _gather_masked(body, gather, key, dtype)


def _channel_sites(model: g.TracedModel, plans, keys: set[str]) -> tuple[dict, dict]:
    """With the channel structure, the Means (_stream_means) and the products (_product_keeps)
    that insert_masks rewrites so their groups may be removed; one analysis finds both."""
    if not any(plan.structure.channels for plan in plans.values()):
        return {}, {}
    from graphprune.channels import analyze

    analysis = analyze(model, through_means=True, through_products=True)
    groups = {group.name: group for group in analysis.groups}
    return _stream_means(model, analysis, groups, plans, keys), _product_keeps(model, analysis, groups, plans, keys)


def _site_kernels(analysis, groups: dict, space: tuple, plans, keys: set[str]) -> tuple:
    """(the channel ids of ``space``, its prunable groups, their kernels) where every kernel of
    those groups is masked with the channel structure; (ids, [], []) where there is none or one
    is not (then nothing may be rewritten for the site)."""
    from graphprune.channels import channel_ids

    ids = channel_ids(analysis, space)
    prunable = [groups[name] for name in (sorted(_group_names(ids)) if ids else []) if groups[name].prunable]
    found = [_masked_kernels(group, plans, keys) for group in prunable]
    if not prunable or any(kernels is None for kernels in found):
        return ids, [], []
    return ids, prunable, [m for kernels in found for m in kernels]


def _masked_kernels(group, plans, keys: set[str]) -> list | None:
    """The kernels of a prunable ``group`` when insert_masks masks every one with the channel
    structure (so their masks tell the kept channels), else None."""
    kernels = [m for m in group.members if m.role != "param"]
    if any(m.kind != "variable" or m.name not in keys or not plans[m.name].structure.channels for m in kernels):
        return None
    return kernels


def _stream_means(model: g.TracedModel, analysis, groups: dict, plans, keys: set[str]) -> dict[str, list]:
    """entry -> [(Mean node, kernel Member, the kernel's other axes, the Mean input's rank)]: each
    Mean over channels that may be removed (every kernel of their prunable groups masked here,
    with the channel structure; a residual stream only with residual_stream: channels.is_stream)
    with a kernel whose axis holds the same channels in the same order (channel_ids: a kernel's
    whole output, or the head dims of one whose rotary pairs split them), so its mask tells the
    kept channels. Means with no such kernel are left, and keep their groups whole."""
    from graphprune.channels import channel_ids, is_stream

    chosen: dict[str, list] = {}
    for site in analysis.means:
        ids, prunable, kernels = _site_kernels(analysis, groups, site.space, plans, keys)
        if not kernels:
            continue
        if any(is_stream(group) for group in prunable) and \
                not all(plans[m.name].structure.residual_stream for m in kernels):
            continue
        same = {(m.name, m.axis) for m in kernels
                if channel_ids(analysis, ("v", m.name, m.axis, None)) == ids}
        if same:
            name, axis = min(same, key=lambda key: (int(np.prod(model.variables[key[0]].shape)), key))
            member = next(m for m in kernels if (m.name, m.axis) == (name, axis))
            other = tuple(a for a in range(len(model.variables[name].shape)) if a != axis)
            chosen.setdefault(site.entry, []).append((site.node, member, other, site.space[4] + 1))
    return chosen


def _product_keeps(model: g.TracedModel, analysis, groups: dict, plans, keys: set[str]) -> dict[str, list]:
    """entry -> [(product node, operand position, kernel Member, the mask's view, the channels' axis
    in it, their offset along it, their count)]:
    each product of two activations read by more than softmaxes (channels.ProductSite) whose
    contracted operand axis carries prunable channels, with a kernel whose mask tells them in that
    axis's order: an axis of the kernel with the same channels (channel_ids), or a factor of one
    split into heads (the mask viewed with that axis split: a fused kernel's head dims), or a part
    of either (the query's of a fused query-key-value kernel). Products with no such kernel are
    left, and keep their groups whole."""
    from graphprune.channels import channel_ids

    chosen: dict[str, list] = {}
    for site in analysis.products:
        ids, _, kernels = _site_kernels(analysis, groups, site.space, plans, keys)
        options = []
        for member in {(m.name, m.axis): m for m in kernels}.values():
            shape = [int(d) for d in model.variables[member.name].shape]
            for space, view, axis in _factor_views(analysis, ("v", member.name, member.axis, None), shape,
                                                   member.axis):
                offset = _offset_of(ids, channel_ids(analysis, space))
                if offset is not None:
                    options.append((int(np.prod(shape)), member.name, member.axis, member, (view, axis, offset)))
                    break
        if options:
            *_, member, (view, axis, offset) = min(options, key=lambda item: item[:3])
            chosen.setdefault(site.entry, []).append((site.node, site.operand, member, view, axis, offset, len(ids)))
    return chosen


def _offset_of(ids: list, found) -> int | None:
    """Where ``ids`` lie, in order, in ``found`` (a fused query-key-value kernel's axis holds the
    query's head dims from 0, the key's after them), or None."""
    if not found or len(found) < len(ids):
        return None
    return next((start for start in range(len(found) - len(ids) + 1) if found[start:start + len(ids)] == ids), None)


def _factor_views(analysis, space: tuple, shape: list, axis: int):
    """(space, view, axis): ``space`` at ``axis`` of ``shape``, then each factor of it where the
    analysis split it into heads x head dims (Analysis.refined), at its axis of ``shape`` viewed
    with that axis split, depth first."""
    yield space, shape, axis
    parts = analysis.refined.get(space)
    if parts is None or any(analysis.sizes.get(part) is None for part in parts):
        return
    outer, inner = parts
    view = shape[:axis] + [analysis.sizes[outer], analysis.sizes[inner]] + shape[axis + 1:]
    if int(np.prod(view)) != int(np.prod(shape)):
        return
    yield from _factor_views(analysis, outer, view, axis)
    yield from _factor_views(analysis, inner, view, axis + 1)


def _group_names(ids) -> set[str]:
    """The group names in channel_ids' ids (pairs, nested where a space is refined)."""
    found = set()
    for item in ids:
        if isinstance(item[0], str):
            found.add(item[0])
        else:
            found |= _group_names(item)
    return found


def _kept_mean(body: b.Body, name: str, member, other_axes: tuple, rank: int) -> None:
    """Mean(x, last axis of ``rank``) -> Sum(x * keep) / Sum(keep), under the Mean's name: keep is
    the group's 0/1 channel vector, the maximum of ``member``'s mask over ``other_axes`` (every other
    group keeps a channel, so a kept channel has a one in its slice). Read where the kernel's mask
    is read in this body; a body without one keeps its Mean (and its group stays whole)."""
    node, (mask, stored) = body.node(name), _mask_read(body, member)
    if node is None or mask is None:
        return
    x, axes = body.data_inputs(node)[:2]
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    part = lambda label: names.kept_mean(name, label)  # noqa: E731
    keep = _channel_keep(body, part, body.ref(mask.name), stored, dtype, other_axes)
    shape = body.add(g.const_node(part("keep_shape"), np.array([1] * (rank - 1) + [-1], np.int32),
                                  "int32"))
    keep = body.add(g.make_node(part("keep"), "Reshape", [keep, body.ref(shape.name)], T=dtype,
                                Tshape=tf.int32))
    masked = body.add(g.make_node(part("kept"), "Mul", [x, body.ref(keep.name)], T=dtype))
    total = body.add(g.make_node(part("sum"), "Sum", [body.ref(masked.name), axes], T=dtype,
                                 Tidx=tf.dtypes.as_dtype(node.attr["Tidx"].type),
                                 keep_dims=bool(node.attr["keep_dims"].b)))
    every = body.add(g.const_node(part("all_axes"), np.arange(rank, dtype=np.int32), "int32"))
    count = body.add(g.make_node(part("count"), "Sum", [body.ref(keep.name), body.ref(every.name)], T=dtype,
                                 Tidx=tf.int32, keep_dims=False))
    replacement = g.make_node(name, "RealDiv", [body.ref(total.name), body.ref(count.name)], T=dtype)
    replacement.input.extend(i for i in node.input if i.startswith("^"))
    body.replace(node, replacement)


def _kept_product(body: b.Body, name: str, operand: int, member, view: list, axis: int, offset: int,
                  count: int) -> None:
    """Input ``operand`` x of product ``name`` -> x * keep, keep being the group's 0/1 channels along
    x's last axis: the maximum of ``member``'s mask, viewed as ``view``, over every axis but
    ``axis``, of its ``count`` values there from ``offset`` (the query's part of a fused kernel). A
    removed channel then adds exactly zero to the product (whatever the bias left in it), which
    removing it matches however the product is read. Read where the kernel's mask is read in this
    body; a body without one keeps its product (and its group stays whole)."""
    node, (mask, stored) = body.node(name), _mask_read(body, member)
    if node is None or mask is None:
        return
    x = body.data_inputs(node)[operand]
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    part = lambda label: names.kept_product(name, operand, label)  # noqa: E731
    source = body.ref(mask.name)
    shape = body.add(g.const_node(part("view_shape"), np.array(view, np.int32), "int32"))
    source = body.ref(body.add(g.make_node(part("view"), "Reshape", [source, body.ref(shape.name)], T=stored,
                                           Tshape=tf.int32)).name)
    if (offset, count) != (0, view[axis]):
        begin = [offset if a == axis else 0 for a in range(len(view))]
        size = [count if a == axis else -1 for a in range(len(view))]
        begin = body.add(g.const_node(part("cut_begin"), np.array(begin, np.int32), "int32"))
        size = body.add(g.const_node(part("cut_size"), np.array(size, np.int32), "int32"))
        source = body.ref(body.add(g.make_node(part("cut"), "Slice", [source, body.ref(begin.name),
                                                                       body.ref(size.name)], T=stored,
                                               Index=tf.int32)).name)
    keep = _channel_keep(body, part, source, stored, dtype, tuple(a for a in range(len(view)) if a != axis))
    applied = body.add(g.make_node(part("apply"), "Mul", [x, keep], T=dtype))
    body.set_input(node, operand, body.ref(applied.name))


def _mask_read(body: b.Body, member) -> tuple:
    """(the node reading ``member``'s mask in this body, as the weight's dtype where it is cast,
    and that node's dtype), or (None, None) where the body does not read it."""
    mask = body.node(names.mask_cast_node(member.name)) or body.node(names.mask_read_node(member.name))
    if mask is None:
        return None, None
    return mask, tf.dtypes.as_dtype(mask.attr["DstT" if mask.op == "Cast" else "dtype"].type)


def _channel_keep(body: b.Body, part, source: str, stored, dtype, other_axes: tuple) -> str:
    """A group's 0/1 channel vector, as ``dtype``: the maximum of ``source`` (a kernel's mask read
    as ``stored``, or a view of it) over ``other_axes`` ('keep_max', which fold_masks freezes),
    cast ('keep_cast') where the two dtypes differ; its tensor."""
    other = body.add(g.const_node(part("other_axes"), np.array(other_axes, np.int32), "int32"))
    keep = body.add(g.make_node(part("keep_max"), "Max", [source, body.ref(other.name)], T=stored, Tidx=tf.int32,
                                keep_dims=False))
    if stored != dtype:
        keep = body.add(g.make_node(part("keep_cast"), "Cast", [body.ref(keep.name)], SrcT=stored, DstT=dtype,
                                    Truncate=False))
    return body.ref(keep.name)


def _gather_masked(body: b.Body, gather, key: str, dtype) -> None:
    """ResourceGather(w, ids) -> GatherV2(w * mask, ids, axis 0), under the gather's name: a tied
    embedding's lookup sees the same pruned weight as its output projection."""
    masked = names.masked_node(key)
    axis = f"{names.node_scope(key)}/gather_axis"
    if body.node(axis) is None:
        body.add(g.const_node(axis, np.array(0, np.int32), "int32"))
    replacement = g.make_node(gather.name, "GatherV2", [body.ref(masked), gather.input[1], body.ref(axis)],
                              Tparams=dtype, Taxis=tf.int32)
    replacement.attr["Tindices"].CopyFrom(gather.attr["Tindices"])
    replacement.attr["batch_dims"].i = 0
    replacement.input.extend(i for i in gather.input if i.startswith("^"))
    body.replace(gather, replacement)


register_pass("insert_masks", insert_masks, options=[
    Option("sparsity", "float", None, "one-shot: initial masks at this sparsity (else all ones)"),
    *CONFIG_OPTIONS,
])
