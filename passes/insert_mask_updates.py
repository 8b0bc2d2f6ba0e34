"""insert_mask_updates: the step variable, the schedule, and the conditional mask update.

Precondition: weights are masked (insert_masks ran). Adds one int64 variable ``graphprune/step``
(starting at 0: the first update is step 1, as a model's first training batch is in the reference
toolkit, whose wrapper increments its step before the mask update), a scalar
``<w>/graphprune/threshold`` per masked weight, and an entry ``update_masks`` (no inputs) whose
graph does:

    step += 1
    for each schedule (weights with their own sparsity have their own):
        should_prune, target = schedule(step)
        If(should_prune):  mask, threshold = magnitude rule(w * mask, target)   # pruned stay pruned
                           assign mask, threshold; assign w := w * mask       # storage sparse too
    outputs: step, should_prune and target_sparsity of the main schedule; with channel groups,
    channel_sparsity (the fraction of the pruned groups' channels removed, read off the masks)

The graph is built from TF ops (the same ``compute_masks`` the one-shot prune uses) in a scratch
graph, then kept as a GraphDef like every other entry. Re-running with the same config is a no-op.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import tensorflow as tf

from graphprune import graph as g
from graphprune import names
from graphprune.analysis import weights_of
from graphprune.channels import channel_groups, stream_reasons
from graphprune.config import PruningConfig, make_config
from graphprune.errors import PassError
from graphprune.masks import pruned_values
from graphprune.names import STEP_KEY, UPDATE_ENTRY, threshold_key  # noqa: F401  (also imported from here)
from graphprune.passbase import CONFIG_OPTIONS, PassContext, PassResult, register_pass
from graphprune.update import channel_sparsity, compute_masks


def insert_mask_updates(model: g.TracedModel, context: PassContext, config: PruningConfig | None = None,
                        **options) -> PassResult:
    """Add the step variable, the schedule ops and the conditional mask update entry."""
    if config is None:
        config = make_config(**options)
    weights = [w for w in weights_of(model) if w.mask is not None and w.mask in model.variables]
    if not weights:
        raise PassError("insert_mask_updates: no masked weight; run insert_masks first")
    plans, _ = config.plan(weights)
    weights = [w for w in weights if w.key in plans]
    description = repr((config, sorted(w.key for w in weights)))
    if model.facts.get("update_config") == description and any(e.name == UPDATE_ENTRY for e in model.entries):
        return PassResult(model, changed=False, report={"updates": [w.key for w in weights]})

    specs = [g.VariableSpec(STEP_KEY, (), "int64", g.ROLE_STEP, trainable=False, initial=np.array(0, np.int64))]
    specs += [
        g.VariableSpec(threshold_key(w.key), (), w.dtype, g.ROLE_THRESHOLD, trainable=False,
                       initial=np.zeros((), tf.dtypes.as_dtype(w.dtype).as_numpy_dtype), weight=w.key)
        for w in weights
    ]
    new_model = model.with_variables(specs)
    groups = channel_groups(model) if any(plan.structure.channels for plan in plans.values()) else ()
    if groups:
        groups = stream_reasons(model, groups, any(plan.structure.residual_stream for plan in plans.values()))
    entry = _build_update_entry(new_model, config, weights, plans, groups)
    entries = tuple(e for e in model.entries if e.name != UPDATE_ENTRY) + (entry,)
    new_model = dataclasses.replace(new_model, entries=entries)
    report = {
        "updates": [w.key for w in weights],
        "schedules": sorted({repr(plans[w.key].schedule) for w in weights}),
        "scope": config.scope,
    }
    if groups:
        report["channel_groups"] = {"prunable": sum(group.prunable for group in groups), "whole": sum(
            not group.prunable for group in groups)}
        new_model = new_model.with_facts(channel_groups=groups)
    return PassResult(new_model.with_facts(update_config=description), changed=True, report=report)


def _build_update_entry(model, config, weights, plans, coupled=()) -> g.Entry:
    graph = tf.Graph()
    resources = {}
    with graph.as_default(), tf.name_scope(f"{names.SCOPE}/update"):
        handles = {}

        def handle(key):
            if key not in handles:
                name = names.resource_placeholder_node(key)
                placeholder = tf.compat.v1.placeholder(tf.resource, [], name=name)
                resources[placeholder.op.name] = key
                handles[key] = placeholder
            return handles[key]

        def read(key):
            spec = model.variables[key]
            value = tf.raw_ops.ReadVariableOp(resource=handle(key), dtype=tf.dtypes.as_dtype(spec.dtype))
            value.set_shape(spec.shape)  # a bare resource placeholder carries no shape
            return value

        step = read(STEP_KEY) + 1
        advance = tf.raw_ops.AssignVariableOp(resource=handle(STEP_KEY), value=step)
        # Weights sharing a schedule (and the global threshold) are updated together; so are all
        # channel-structured weights (a channel group spans kernels with different rules, whose
        # schedules differ only in their final sparsity: each gets its own target in the branch).
        groups: dict = {}
        for weight in weights:
            plan = plans[weight.key]
            groups.setdefault(config.schedule if plan.structure.channels else plan.schedule, []).append(weight)
        main_should, main_target = None, None
        updates = []
        with tf.control_dependencies([advance]):
            for schedule, members in groups.items():
                for weight in members:  # create every placeholder outside the branch functions
                    handle(weight.key), handle(weight.mask), handle(threshold_key(weight.key))
                should_prune, target = schedule(step)
                branch = _update_branch(model, members, plans, schedule, target, read, handle, step, coupled)
                updated = tf.cond(should_prune, branch, lambda: tf.constant(False))
                updates.append(updated)
                if schedule == config.schedule or main_should is None:
                    main_should, main_target = updated, target
        # Every group's update must feed the outputs, or it would be pruned at run time.
        with tf.control_dependencies(updates):
            step_out = tf.identity(step, name="step")
            should_out = tf.identity(main_should, name="should_prune")
            target_out = tf.identity(main_target, name="target_sparsity")
            channel_keys = [w for w in weights if plans[w.key].structure.channels]
            removed = channel_sparsity({w.key: read(w.mask) for w in channel_keys}, coupled) if coupled else None
            removed_out = tf.identity(removed, name="channel_sparsity") if removed is not None else None
    # The branch functions are owned by the scratch graph, and the eager context forgets their
    # names when it is collected; content-hashed names are owned by no Python object.
    graph_def = graph.as_graph_def()
    _declare_side_effects(graph_def)
    graph_def = g.rename_functions(graph_def, g.content_suffix)
    structure = {
        "should_prune": tf.TensorSpec([], tf.bool),
        "step": tf.TensorSpec([], tf.int64),
        "target_sparsity": tf.TensorSpec([], tf.float32),
    }
    # Output order is tf.nest's: sorted keys.
    outputs = (should_out.name, step_out.name, target_out.name)
    if removed_out is not None:  # the fraction of the pruned groups' channels removed, after the update
        structure["channel_sparsity"] = tf.TensorSpec([], tf.float32)
        outputs = (removed_out.name,) + outputs
    return g.Entry(
        name=UPDATE_ENTRY,
        kind="update",
        graph_def=graph_def,
        inputs=(),
        outputs=outputs,
        resources=MappingProxyType(resources),
        input_structure=((), {}),
        output_structure=structure,
    )


def _declare_side_effects(graph_def) -> None:
    """Make every assign in the cond branch functions a control output of its function.

    A plain tf.Graph (unlike a tf.function) gives cond branches no control outputs, so the assigns
    ran only because the branch's return value was used. When ``update_masks()`` is called inside
    another tf.function that ignores its outputs, the call is inlined, the return value is dead and
    TensorFlow prunes the assigns: the step advanced but the masks never changed. Control outputs
    are kept whatever the caller does with the outputs.
    """
    for function in graph_def.library.function:
        for node in function.node_def:
            if node.op == "AssignVariableOp" and node.name not in function.control_ret:
                function.control_ret[node.name] = node.name
                function.signature.control_output.append(node.name)


def _update_branch(model, members, plans, schedule, target, read, handle, step, coupled=()):
    def branch():
        values = {w.key: read(w.key) for w in members}
        alive = {w.key: read(w.mask) for w in members}
        by_key = {w.key: w for w in members}

        def assign(key, mask, threshold):
            weight = by_key[key]
            stored = tf.cast(mask, model.variables[weight.mask].dtype)
            return [tf.raw_ops.AssignVariableOp(resource=handle(weight.mask), value=stored),
                    tf.raw_ops.AssignVariableOp(resource=handle(threshold_key(key)), value=threshold),
                    tf.raw_ops.AssignVariableOp(resource=handle(key), value=pruned_values(values[key], mask))]

        assigns = []
        by_schedule = {schedule: target}  # a channel rule's schedule: its own target, computed once
        for w in members:
            if plans[w.key].schedule not in by_schedule:
                by_schedule[plans[w.key].schedule] = plans[w.key].schedule(step)[1]
        targets = {w.key: by_schedule[plans[w.key].schedule] for w in members}
        compute_masks(values, plans, targets, {w.key: w.input_axis for w in members},
                      alive, step=step, consume=lambda *result: assigns.extend(assign(*result)) or assigns[-3:],
                      groups=coupled)
        with tf.control_dependencies(assigns):
            return tf.constant(True)

    return branch


register_pass("insert_mask_updates", insert_mask_updates, options=CONFIG_OPTIONS)
