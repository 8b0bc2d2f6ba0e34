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
    entries = tuple(entry if entry.kind == "update" else
                    b.rewrite_entry(entry, lambda body: _mask_body(body, keys, new_variables), variables=new_variables)[0] for entry in model.entries)
    new_model = dataclasses.replace(model, entries=entries).with_variables(specs)
    masked = tuple(dataclasses.replace(w, mask=mask_key(w.key)) if w.key in keys else w for w in weights)
    report = {"masked": sorted(keys), "skipped": skipped,
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
