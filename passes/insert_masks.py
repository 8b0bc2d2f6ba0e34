"""insert_masks: a mask variable per weight, multiplied in front of every read of that weight.

Matches every ReadVariableOp of a weight recorded by find_weights (runs it if needed), in every
entry. Rewrites:

    before:  Placeholder(w) -> ReadVariableOp -> MatMul           (and ResourceGather(w, ids))
    after:   Placeholder(w) -> ReadVariableOp ----------------> Mul '<w>/graphprune/masked' -> MatMul
             Placeholder('<w>/graphprune/mask/resource') -> ReadVariableOp '<w>/graphprune/mask/read' /

An embedding lookup of a masked weight (ResourceGather) becomes GatherV2(w * mask, ids), so a
tied embedding is masked once for both of its uses. One non-trainable mask variable ``<w>/graphprune/mask`` per weight (shared by all its uses and
entries), initialised to ones, or with ``sparsity=`` to the magnitude mask of the weight's current
value (one-shot pruning). Weights that are already masked are left alone, so a re-run is a no-op. Inside While/If bodies
the mask enters as one more loop variable (or branch input) and the Mul happens in the body.
Postcondition: every use of a masked weight reads ``w * mask``; with all-ones masks the model
computes exactly what it computed before.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import dtypes

from graphprune import functions
from graphprune import graph as g
from graphprune.config import PruningConfig, make_config
from graphprune.errors import PassError
from graphprune.passes.find_weights import resource_key, resource_of, weights_of
from graphprune.pipeline import PassContext, PassResult, register_pass
from graphprune.schedules import ConstantSparsity
from graphprune.update import compute_masks


def mask_key(weight_key: str) -> str:
    return f"{weight_key}/{g.SCOPE}/mask"


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

    initial = _initial_masks(model, context, to_mask, plans, sparsity)
    specs = [
        g.VariableSpec(key=mask_key(w.key), shape=w.shape, dtype=w.dtype, role=g.ROLE_MASK, trainable=False,
                       initial=initial[w.key], weight=w.key)
        for w in to_mask
    ]
    keys = {w.key for w in to_mask}
    entries = tuple(_mask_entry(entry, keys, model) if entry.kind != "update" else entry for entry in model.entries)
    new_model = dataclasses.replace(model, entries=entries).with_variables(specs)
    masked = tuple(dataclasses.replace(w, mask=mask_key(w.key)) if w.key in keys else w for w in weights)
    report = {"masked": sorted(keys), "skipped": skipped,
              "initial_sparsity": {k: float(1 - np.mean(v)) for k, v in initial.items()}}
    return PassResult(new_model.with_facts(weights=masked), changed=True, report=report)


def _initial_masks(model, context, weights, plans, sparsity) -> dict[str, np.ndarray]:
    if sparsity is None:
        return {w.key: np.ones(w.shape, dtype=dtypes.as_dtype(w.dtype).as_numpy_dtype) for w in weights}
    values = {w.key: tf.constant(context.value(model, w.key)) for w in weights}
    # One-shot: each weight goes to its plan's final sparsity (own-sparsity rules included).
    targets = {w.key: tf.constant(plans[w.key].schedule.final_sparsity, tf.float32) for w in weights}
    computed = compute_masks(values, plans, targets, {w.key: w.input_axis for w in weights})
    return {key: mask.numpy() for key, (mask, _) in computed.items()}


def _mask_entry(entry: g.Entry, keys: set[str], model: g.TracedModel) -> g.Entry:
    graph_def = g.copy_graph(entry.graph_def)
    index = g.NodeIndex(graph_def)
    reads: dict[str, list] = {}
    gathers: dict[str, list] = {}
    for node in graph_def.node:
        if node.op == "ReadVariableOp":
            key = resource_of(index, entry, node)
            if key in keys:
                reads.setdefault(key, []).append(node)
        elif node.op == "ResourceGather" and node.attr["batch_dims"].i == 0:
            key = resource_key(index, entry, node.input[0])
            if key in keys:
                gathers.setdefault(key, []).append(node)
    for key, gather_nodes in gathers.items():
        if key not in reads:  # a weight only looked up (embedding): read it, so it can be masked
            read = g.make_node(f"{g.node_scope(key)}/read", "ReadVariableOp", [gather_nodes[0].input[0]],
                               dtype=dtypes.as_dtype(model.variables[key].dtype))
            graph_def.node.append(read)
            reads[key] = [read]
    resources = dict(entry.resources)
    body_masked = _mask_bodies(graph_def, index, entry, keys, model, resources)
    if not reads and not body_masked:
        return entry
    for key, read_nodes in sorted(reads.items()):
        scope = g.node_scope(key)
        dtype = dtypes.as_dtype(model.variables[key].dtype)
        placeholder = _mask_placeholder(graph_def, key, resources)
        mask_read = f"{scope}/mask/read"
        graph_def.node.append(g.make_node(mask_read, "ReadVariableOp", [placeholder], dtype=dtype))
        for number, read in enumerate(sorted(read_nodes, key=lambda n: n.name)):
            masked = f"{scope}/masked" + (f"_{number}" if number else "")
            for consumer, position in index.consumers.get(read.name, []):
                source, output, control = g.parse_input(consumer.input[position])
                if not control and output == 0:
                    consumer.input[position] = masked
            graph_def.node.append(g.make_node(masked, "Mul", [read.name, mask_read], T=dtype))
        if key in gathers:
            _gather_masked(graph_def, gathers[key], f"{scope}/masked", scope, dtype)
    return dataclasses.replace(entry, graph_def=graph_def, resources=resources)


def _gather_masked(graph_def, gather_nodes, masked: str, scope: str, dtype) -> None:
    """ResourceGather(w, ids) -> GatherV2(w * mask, ids, axis 0), under the gather's name: a tied
    embedding's lookup sees the same pruned weight as its output projection."""
    axis = f"{scope}/gather_axis"
    graph_def.node.append(g.const_node(axis, np.array(0, np.int32), "int32"))
    for gather in gather_nodes:
        replacement = g.make_node(gather.name, "GatherV2", [masked, gather.input[1], axis], Tparams=dtype,
                                  Taxis=dtypes.int32)
        replacement.attr["Tindices"].CopyFrom(gather.attr["Tindices"])
        replacement.attr["batch_dims"].i = 0
        replacement.input.extend(i for i in gather.input if i.startswith("^"))
        gather.CopyFrom(replacement)


def _mask_placeholder(graph_def, key: str, resources: dict) -> str:
    """The entry's resource placeholder for ``key``'s mask, added once."""
    placeholder = f"{g.node_scope(key)}/mask/resource"
    if placeholder not in resources:
        graph_def.node.append(g.resource_placeholder(placeholder))
        resources[placeholder] = mask_key(key)
    return placeholder


def _mask_bodies(graph_def, index, entry, keys, model, resources) -> bool:
    """Mask weights read inside While/If bodies: each mask enters as one more loop variable (or
    branch input) and is read and multiplied inside the body."""
    library = functions.library_of(graph_def)
    changed = False
    for outer in list(graph_def.node):
        attrs = functions.body_attrs(outer)
        if not attrs:
            continue
        bodies = {attr: library[outer.attr[attr].func.name] for attr, _ in attrs
                  if outer.attr[attr].func.name in library}
        offset = attrs[0][1]
        arguments = {attr: functions.argument_resources(index, entry, outer, function, offset)
                     for attr, function in bodies.items()}
        read_keys = set()
        for attr, function in bodies.items():
            read_keys |= {arguments[attr].get(functions.producer_name(n.input[0])) for n in function.node_def
                          if n.op == "ReadVariableOp"} & keys
        if not read_keys:
            continue
        copies = {attr: functions.copy_function(function) for attr, function in bodies.items()}
        for key in sorted(read_keys):
            placeholder = _mask_placeholder(graph_def, key, resources)
            if outer.op in functions.LOOP_OPS:
                functions.add_resource_loop_variable(outer, placeholder)
            else:
                functions.add_branch_input(outer, placeholder)
            argument_name = f"graphprune_mask_{len(copies[attrs[0][0]].signature.input_arg)}"
            for attr, function in copies.items():
                functions.add_argument(function, argument_name, passthrough=attr == "body")
                _mask_reads_in_body(function, arguments[attr], key, argument_name, model)
        for attr, function in copies.items():
            outer.attr[attr].func.name = functions.rename_with_content_hash(function)
            graph_def.library.function.append(function)
        changed = True
    return changed


def _mask_reads_in_body(function, arguments: dict, key: str, argument_name: str, model) -> None:
    reads = sorted((n for n in function.node_def if n.op == "ReadVariableOp"
                    and arguments.get(functions.producer_name(n.input[0])) == key), key=lambda n: n.name)
    if not reads:
        return
    scope = g.node_scope(key)
    dtype = dtypes.as_dtype(model.variables[key].dtype)
    mask_read = f"{scope}/mask/read"
    function.node_def.append(g.make_node(mask_read, "ReadVariableOp", [argument_name], dtype=dtype))
    for number, read in enumerate(reads):
        masked = f"{scope}/masked" + (f"_{number}" if number else "")
        old = f"{read.name}:value:0"
        functions.repoint(function, old, f"{masked}:z:0")
        function.node_def.append(g.make_node(masked, "Mul", [old, f"{mask_read}:value:0"], T=dtype))


register_pass("insert_masks", insert_masks)
