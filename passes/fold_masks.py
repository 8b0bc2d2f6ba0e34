"""fold_masks: w * mask becomes the weight itself; the masks and the mask update go away.

Matches the Mul nodes insert_masks added ('<w>/graphprune/masked[_N]'), in every body at any
depth. Rewrites:

    freeze=True:   Mul '<w>/graphprune/masked' -> Const '<w>/graphprune/masked' = value(w) * value(mask)
                   (a second read of w in the same body: an Identity of that Const)
    freeze=False:  Mul '<w>/graphprune/masked' -> Identity(read(w)), and w's value becomes w * mask
    keep=(w, ...): those weights are folded as with freeze=False even when freezing (large
                   weights stay variables: see finalization.MAX_FROZEN_BYTES)
    stored=(w, ...): those weights' variables already hold w * mask (the caller folded them into
                   its own copies): their graph is rewritten, no value is computed or assigned

The replacement keeps the Mul's name, so consumers need no rewiring (the fold_batch_norms trick).
The update entry (step, schedule, thresholds) is dropped: with no mask left it has nothing to do.
Postcondition: no Mul by a mask; the mask reads are dead (strip_unused removes them); outputs
equal the masked model's. Needs the current values of the weights and masks in the context.
Drops the ``weights`` fact: the weights it describes are no longer masked reads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune import names
from graphprune.analysis import is_mask_multiply, mask_operand_key
from graphprune.masks import pruned_values
from graphprune.passbase import Option, PassContext, PassResult, register_pass


def fold_masks(model: g.TracedModel, context: PassContext, freeze: bool = True, keep: tuple = (),
               stored: tuple = ()) -> PassResult:
    """Fold each mask into its weight (a Const with freeze=True, else the variable's value)."""
    folded_values: dict[str, np.ndarray] = {}
    folded, kept, touched = set(), set(keep), []

    def fold(body: b.Body, entry_name: str) -> None:
        constants: dict[str, str] = {}
        for node in list(body.nodes):
            if "keep_max" in (names.kept_mean_part(node.name), names.kept_product_part(node.name)):
                # a mean over kept channels, or a product zeroing removed ones: the 0/1 channel vector
                body.replace(node, _frozen_keep(body, node, model, context))
                touched.append(f"{entry_name}:{body.use_name(node)}")
                continue
            if not is_mask_multiply(node):
                continue
            weight_key = body.read_key(body.producer(node.input[0]))
            mask_key = mask_operand_key(body, node)
            if weight_key is None or mask_key is None:
                continue
            constant = freeze and weight_key not in kept
            if weight_key not in folded_values and weight_key in stored and constant:
                folded_values[weight_key] = context.value(model, weight_key)  # already w * mask
            elif weight_key not in folded_values and weight_key not in stored:
                folded_values[weight_key] = pruned_values(context.value(model, weight_key),
                                                          context.value(model, mask_key))
            folded.add(weight_key)
            dtype = model.variables[weight_key].dtype
            if constant:
                replacement = b.const_once(body, constants, node.name, weight_key, folded_values[weight_key], dtype)
            else:
                replacement = g.make_node(node.name, "Identity", [node.input[0]], T=tf.dtypes.as_dtype(dtype))
            body.replace(node, replacement)
            touched.append(f"{entry_name}:{body.use_name(node)}")

    entries = tuple(b.rewrite_entry(entry, lambda body, name=entry.name: fold(body, name))[0]
                    for entry in model.entries if entry.kind != "update")
    dropped_update = len(entries) != len(model.entries)
    if not touched and not dropped_update:
        return PassResult(model, changed=False, report={"folded": []})
    new_model = dataclasses.replace(model, entries=entries)
    assigned = {key: value for key, value in folded_values.items() if not freeze or key in kept}
    if assigned:
        new_model = new_model.with_variables(
            dataclasses.replace(model.variables[key], value=value) for key, value in assigned.items()
        )
    report = {"folded": sorted(folded), "nodes": touched, "freeze": freeze,
              "variables": sorted(key for key in folded if not freeze or key in kept),
              "sparsity": {k: float(np.mean(v == 0)) for k, v in folded_values.items()}}
    return PassResult(new_model, changed=True, report=report)


def _frozen_keep(body: b.Body, node, model: g.TracedModel, context: PassContext):
    """The Const of a kept-channel vector (insert_masks._kept_mean, _kept_product): the maximum of
    the mask it reads (through a Reshape and a Slice: a view of it, a part of that) over the other
    axes, at the mask's value."""
    mask, axes = body.data_inputs(node)[:2]
    read, views = body.producer(mask), []
    while read.op in ("Reshape", "Slice"):  # a view of the mask, a part of it (insert_masks._kept_product)
        views.append((read.op, [tf.make_ndarray(body.producer(ref).attr["value"].tensor)
                                for ref in body.data_inputs(read)[1:]]))
        read = body.producer(body.data_inputs(read)[0])
    if read.op == "Cast":
        read = body.producer(read.input[0])
    value = np.asarray(context.value(model, body.read_key(read)))
    for op, operands in reversed(views):
        if op == "Reshape":
            value = value.reshape(operands[0])
        else:
            value = value[tuple(slice(start, None if size < 0 else start + size) for start, size in zip(*operands))]
    axes = tf.make_ndarray(body.producer(axes).attr["value"].tensor)
    dtype = tf.dtypes.as_dtype(node.attr["T"].type)
    return g.const_node(node.name, np.max(value, axis=tuple(np.ravel(axes).tolist())).astype(dtype.as_numpy_dtype),
                        dtype.name)


register_pass("fold_masks", fold_masks, options=[
    Option("freeze", "bool", True, "fold into constants (else into the variables' values)"),
    Option("keep", "object", (), "weight keys folded into their variables even when freezing (Python callers)"),
    Option("stored", "object", (), "weight keys whose variables already hold their pruned values (Python callers)"),
], invalidates=("weights",))
