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
fold_masks freezes keep; shrink_channels slices it and turns an all-ones one back into the Mean.
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
    means = _stream_means(model, plans, keys)

    def rewrite(body, entry_name):
        _mask_body(body, keys, new_variables)
        if not body.is_function:
            for site in means.get(entry_name, ()):
                _kept_mean(body, *site)

    entries = tuple(entry if entry.kind == "update" else
                    b.rewrite_entry(entry, lambda body, name=entry.label: rewrite(body, name),
                                    variables=new_variables)[0] for entry in model.entries)
    new_model = dataclasses.replace(model, entries=entries).with_variables(specs)
    masked = tuple(dataclasses.replace(w, mask=mask_key(w.key)) if w.key in keys else w for w in weights)
    report = {"masked": sorted(keys), "skipped": skipped, "kept_means": sum(len(v) for v in means.values()),
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


def _stream_means(model: g.TracedModel, plans, keys: set[str]) -> dict[str, list]:
    """entry -> [(Mean node, kernel Member, the kernel's other axes, the Mean input's rank)]: each
    Mean over channels that may be removed (every kernel of their prunable groups masked here,
    with the channel structure; a residual stream only with residual_stream: channels.is_stream)
    with a kernel whose axis holds the same channels in the same order (channel_ids: a kernel's
    whole output, or the head dims of one whose rotary pairs split them), so its mask tells the
    kept channels. Means with no such kernel are left, and keep their groups whole."""
    if not any(plan.structure.channels for plan in plans.values()):
        return {}
    from graphprune.channels import analyze, channel_ids, is_stream

    analysis = analyze(model, through_means=True)
    groups = {group.name: group for group in analysis.groups}
    chosen: dict[str, list] = {}
    for site in analysis.means:
        ids = channel_ids(analysis, site.space)
        if ids is None:
            continue
        prunable = [groups[name] for name in sorted(_group_names(ids)) if groups[name].prunable]
        kernels = [m for group in prunable for m in group.members if m.role != "param"]
        if not prunable or any(m.kind != "variable" or m.name not in keys for m in kernels):
            continue
        if any(not plans[m.name].structure.channels for m in kernels):
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
    node = body.node(name)
    mask = body.node(names.mask_cast_node(member.name)) or body.node(names.mask_read_node(member.name))
    if node is None or mask is None:
        return
    x, axes = body.data_inputs(node)[:2]
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    stored = tf.dtypes.as_dtype(mask.attr["DstT" if mask.op == "Cast" else "dtype"].type)
    part = lambda label: names.kept_mean(name, label)  # noqa: E731
    other = body.add(g.const_node(part("other_axes"), np.array(other_axes, np.int32), "int32"))
    keep = body.add(g.make_node(part("keep_max"), "Max", [body.ref(mask.name), body.ref(other.name)],
                                T=stored, Tidx=tf.int32, keep_dims=False))
    if stored != dtype:
        keep = body.add(g.make_node(part("keep_cast"), "Cast", [body.ref(keep.name)], SrcT=stored, DstT=dtype,
                                    Truncate=False))
    shape = body.add(g.const_node(part("keep_shape"), np.array([1] * (rank - 1) + [-1], np.int32),
                                  "int32"))
    keep = body.add(g.make_node(part("keep"), "Reshape", [body.ref(keep.name), body.ref(shape.name)], T=dtype,
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
