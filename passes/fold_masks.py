"""fold_masks: w * mask becomes the weight itself; the masks and the mask update go away.

Matches the Mul nodes insert_masks added ('<w>/graphprune/masked[_N]'). Rewrites, in every entry:

    freeze=True:   Mul '<w>/graphprune/masked' -> Const '<w>/graphprune/masked' = value(w) * value(mask)
    freeze=False:  Mul '<w>/graphprune/masked' -> Identity(read(w)), and w's value becomes w * mask

The replacement keeps the Mul's name, so consumers need no rewiring (the fold_batch_norms trick).
Masked Muls inside While/If bodies are folded the same way (the body is rewritten).
The update entry (step, schedule, thresholds) is dropped: with no mask left it has nothing to do.
Postcondition: no Mul by a mask; the mask reads are dead (strip_unused removes them); outputs
equal the masked model's. Needs the current values of the weights and masks in the context.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tensorflow.python.framework import dtypes

from graphprune import functions
from graphprune import graph as g
from graphprune.masks import pruned_values
from graphprune.passes.find_weights import is_mask_multiply, resource_of
from graphprune.pipeline import PassContext, PassResult, register_pass


def fold_masks(model: g.TracedModel, context: PassContext, freeze: bool = True) -> PassResult:
    """Fold each mask into its weight (a Const with freeze=True, else the variable's value)."""
    folded_values: dict[str, np.ndarray] = {}
    entries = []
    touched = []
    for entry in model.entries:
        if entry.kind == "update":
            continue
        graph_def = g.copy_graph(entry.graph_def)
        index = g.NodeIndex(graph_def)
        for position, node in enumerate(graph_def.node):
            if node.op != "Mul" or not is_mask_multiply(node):
                continue
            read = index.producer(node.input[0])
            weight_key = resource_of(index, entry, read)
            mask_key = resource_of(index, entry, index.producer(node.input[1]))
            if weight_key is None or mask_key is None:
                continue
            if weight_key not in folded_values:
                weight = context.value(model, weight_key)
                mask = context.value(model, mask_key)
                folded_values[weight_key] = pruned_values(weight, mask)
            dtype = model.variables[weight_key].dtype
            if freeze:
                replacement = g.const_node(node.name, folded_values[weight_key], dtype)
            else:
                replacement = g.make_node(node.name, "Identity", [node.input[0]], T=dtypes.as_dtype(dtype))
            graph_def.node[position].CopyFrom(replacement)
            touched.append(f"{entry.name}:{node.name}")
        touched += functions.rewrite_bodies(
            graph_def, entry, lambda function, arguments: _fold_in_body(function, arguments, model, context,
                                                                        folded_values, freeze))
        entries.append(dataclasses.replace(entry, graph_def=graph_def))
    dropped_update = len(entries) != len(model.entries)
    if not touched and not dropped_update:
        return PassResult(model, changed=False, report={"folded": []})
    new_model = dataclasses.replace(model, entries=tuple(entries))
    if not freeze:
        new_model = new_model.with_variables(
            dataclasses.replace(model.variables[key], value=value) for key, value in folded_values.items()
        )
    report = {"folded": sorted(folded_values), "nodes": touched, "freeze": freeze,
              "sparsity": {k: float(np.mean(v == 0)) for k, v in folded_values.items()}}
    return PassResult(new_model, changed=True, report=report)


def _fold_in_body(function, arguments, model, context, folded_values, freeze) -> list:
    body = functions.body_index(function)
    touched = []
    for position, node in enumerate(function.node_def):
        if node.op != "Mul" or not is_mask_multiply(node):
            continue
        reads = [body.get(functions.producer_name(raw)) for raw in node.input[:2]]
        if any(read is None or read.op != "ReadVariableOp" for read in reads):
            continue
        weight_key, mask_key = (arguments.get(functions.producer_name(read.input[0])) for read in reads)
        if weight_key is None or mask_key is None:
            continue
        if weight_key not in folded_values:
            weight = context.value(model, weight_key)
            folded_values[weight_key] = pruned_values(weight, context.value(model, mask_key))
        dtype = model.variables[weight_key].dtype
        if freeze:
            replacement = g.const_node(node.name, folded_values[weight_key], dtype)
        else:
            replacement = g.make_node(node.name, "Identity", [node.input[0]], T=dtypes.as_dtype(dtype))
        functions.replace_body_node(function, position, replacement, "z")
        touched.append(node.name)
    return touched


register_pass("fold_masks", fold_masks)
