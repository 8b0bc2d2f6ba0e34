"""The public entry points: prune a model, save it."""

from __future__ import annotations

import os
import shutil
import warnings

import tensorflow as tf

from graphprune.config import PruningConfig, make_config
from graphprune.errors import BadModelError, NoPrunableWeightsError
from graphprune.io import atomic_directory, check_output
from graphprune.load import load
from graphprune.model import PrunableModel
from graphprune.pipeline import PassContext, VariableValues, run_pipeline
from graphprune.schedules import ConstantSparsity
from graphprune.verify import optional_verifier


def prune(target, schedule=None, *, block_size=(1, 1), block_pooling="AVG", m_by_n=None, scope="layer", rules=(),
          exclude=None, one_shot=False, config: PruningConfig | None = None, verify=False,
          include_gather=False, structure="element", importance="l2", round_to=1,
          residual_stream=False) -> PrunableModel:
    """Rewrite ``target`` so that its MatMul/Conv/Einsum weights are masked and prunable.

    target: a SavedModel directory, a tf.Module, a tf.function with input_signature or a
        ConcreteFunction. A SavedModel on disk is only read.
    schedule: graphprune.PolynomialDecay / ConstantSparsity. With None, masks are inserted (all
        ones) without a step or mask update.
    block_size, block_pooling, m_by_n: the mask structure ((1, 2) blocks, "AVG"/"MAX", (2, 4)).
    structure="channel": remove whole channels (a conv's output channels, a dense layer's neurons)
        with every slice coupled to them (graphprune.channels: dependency groups), each group at
        the schedule's sparsity (the fraction of its channels removed), ranked by ``importance``
        ("l2" or "l1" norm over the group); ``round_to=8`` keeps a multiple of 8 channels (of
        8 values: an attention head of 64 values needs no rounding; channels.rounding).
        ``finalize(..., shrink=True)`` then removes them from the graph: a smaller dense model.
        A layer norm over one kernel's own channels (a conv normalized before its activation)
        removes them with it: each of its Means becomes a mean over the kept channels.
        ``residual_stream=True`` also removes the channels of residual streams that layer norms
        average over (a transformer's hidden size, with its embeddings, biases and norm
        parameters). Off by default: the stream couples every layer.
    scope: "layer" (a threshold per weight) or "global" (one threshold across weights; with
        structure="channel", one ranking of every group's channels, each group's scores divided
        by their mean).
    rules: graphprune.Rule overrides by regex (skip, own sparsity, own structure; with
        structure="channel" a number sparsity sets the groups the kernel produces);
        ``exclude=REGEX`` is a shortcut for a skip rule.
    one_shot: prune to the schedule's final sparsity now (masks set, pruned weights zeroed).
    verify: after every pass, rebuild and compare outputs with the previous stage (all-ones masks).
    include_gather: also prune embedding tables (weights looked up with ResourceGather or GatherV2).
    """
    loaded = load(target)
    if config is None:
        # Without a schedule, masks are inserted (all ones) with no update: a placeholder schedule
        # carries the structure and rules for insert_masks.
        config = make_config(schedule or ConstantSparsity(0.0, 0), block_size=block_size, block_pooling=block_pooling,
                             m_by_n=m_by_n, scope=scope, exclude=exclude, rules=rules, structure=structure,
                             importance=importance, round_to=round_to, residual_stream=residual_stream)
        with_updates = schedule is not None
    else:
        with_updates = True
    steps = [("find_weights", {"include_gather": include_gather}), ("insert_masks", {"config": config})]
    if config.structure.residual_stream:  # tf-keras's fused layer norms, as ops the channel analysis follows
        steps.insert(0, ("unfuse_layer_norms", {}))
    context = PassContext(values=VariableValues(loaded.variables))
    after_pass = optional_verifier(verify, context.values)
    result = run_pipeline(loaded.model, steps, context, after_pass=after_pass)
    model = result.model
    config.check_rules_match(model.facts.get("weights", ()))
    skipped = model.facts.get("skipped_weights") or {}
    if len(skipped) == 1:
        key, reason = next(iter(skipped.items()))
        warnings.warn(f"graphprune: not pruning '{key}': {reason}", stacklevel=2)
    elif skipped:  # once, with the count: pm.skipped() lists every one with its reason
        listed = "; ".join(f"'{key}': {reason}" for key, reason in list(skipped.items())[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"graphprune: not pruning {len(skipped)} weights (pm.skipped() lists them): {listed}{more}",
                      stacklevel=2)
    if not any(w.mask for w in model.facts.get("weights", ())):
        skipped = model.facts.get("skipped_weights") or {}
        detail = f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""
        constants = _constant_kernels(loaded.model)
        hint = (f"its {constants} kernel{'s are' if constants > 1 else ' is a'} constant{'s' * (constants > 1)}, "
                "as graphprune.finalize leaves a model by default: finalize with freeze=False (--nofreeze) to "
                "prune it again" if constants else "check the rules/exclude pattern")
        raise NoPrunableWeightsError(
            f"{loaded.source}: no weight read by MatMul, BatchMatMul, Conv2D/3D, DepthwiseConv2dNative, "
            f"a transposed conv, Einsum or SparseTensorDenseMatMul{detail}; nothing to prune ({hint})"
        )
    if with_updates:
        updates = run_pipeline(model, [("insert_mask_updates", {"config": config})], context, after_pass=after_pass)
        result.reports.extend(updates.reports)
        model = updates.model
    groups = model.facts.get("channel_groups")
    if groups is not None and not any(group.prunable for group in groups):
        reasons = sorted({group.reason for group in groups})
        warnings.warn(f"graphprune: structure='channel': no channel group can be removed safely, so nothing will be "
                      f"pruned ({len(groups)} groups left whole: {'; '.join(reasons[:3])}); graphprune.channel_groups "
                      "lists them", stacklevel=2)
    prunable = PrunableModel(model, loaded.variables, config=config if with_updates else None)
    prunable._graphprune.owner = loaded.owner  # keeps a loaded SavedModel's objects alive
    prunable._graphprune.pipeline = result
    prunable._graphprune.verify_report = after_pass.report if verify else None
    if one_shot:
        prunable.prune_now()
    return prunable


def save(model, output_dir, *, overwrite: bool = False, inputs=()) -> str:
    """Write ``model`` (a PrunableModel) as a SavedModel with the original signatures, atomically.

    The pruned weights are stored exactly masked (pruned elements +0.0): ``apply_masks()`` runs
    first, since optimizers with momentum move pruned weights between mask updates (the outputs
    never see it: the forward pass reads w * mask). A prunable SavedModel reloaded with
    ``tf.saved_model.load`` (trained in your own loop) is saved the same way, with its signatures."""
    state = getattr(model, "_graphprune", None)
    if state is None:
        return _save_reloaded(model, output_dir, overwrite=overwrite, inputs=inputs)
    check_output(output_dir, overwrite=overwrite, inputs=inputs)
    # A polymorphic method is saved with every trace it had: trace them all now (SavedModel
    # stores the traces a tf.function holds).
    polymorphic = {name.split("#")[0] for name in state.concrete if "#" in name}
    for name in list(state.concrete):
        if name.split("#")[0] in polymorphic:
            state.concrete[name]
    if model.masks:
        model.apply_masks()
    # Aliased signatures are traced by SavedModel itself (see rebuild.build_alias_function).
    signatures = {name: state.signatures[name] for name in state.signatures if name not in state.save_signatures}
    signatures.update(state.save_signatures)
    if not signatures:
        signatures = {"serving_default": state.concrete[state.default_name]}
    with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs) as temp:
        try:
            tf.saved_model.save(model, temp, signatures=signatures)
        except ValueError as error:
            if "custom gradient" not in str(error):
                raise
            # Some custom gradients (Keras swish) capture tensors SavedModel cannot store; the
            # forward graphs are unaffected, gradients after reload use the ops' own gradients.
            warnings.warn(f"graphprune: saving without custom gradients ({str(error).splitlines()[0][:120]})",
                          stacklevel=2)
            shutil.rmtree(temp)
            os.makedirs(temp)
            tf.saved_model.save(model, temp, signatures=signatures,
                                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return os.path.abspath(os.fspath(output_dir))


def _constant_kernels(model) -> int:
    """The most constants of two or more axes that one entry's prunable ops read (through views)
    as weight operands, as a frozen model's kernels are."""
    from graphprune import body as b
    from graphprune.analysis import PRUNABLE_OPS, weight_operands, weight_source

    def visit(body, found):
        for node in body.nodes:
            for _, ref in weight_operands(node, PRUNABLE_OPS):
                producer = weight_source(body, ref)[0]
                if producer is not None and producer.op == "Const" and \
                        len(producer.attr["value"].tensor.tensor_shape.dim) >= 2:
                    found.add(producer.name)

    counts = [0]
    for entry in model.entries:  # each entry has its own copies of the kernels
        found = set()
        b.visit_entry(entry, lambda body: visit(body, found))
        counts.append(len(found))
    return max(counts)


def _save_reloaded(model, output_dir, *, overwrite: bool, inputs) -> str:
    from graphprune.training import apply_masks

    if not (hasattr(model, "update_masks") and hasattr(model, "masks") and hasattr(model, "pruned_weights")):
        raise BadModelError(f"graphprune.save takes a PrunableModel (graphprune.prune) or a reloaded prunable "
                            f"SavedModel, got {type(model).__name__}; save other models with tf.saved_model.save")
    check_output(output_dir, overwrite=overwrite, inputs=inputs)
    apply_masks(model)
    with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs) as temp:
        tf.saved_model.save(model, temp, signatures=dict(model.signatures) or None)
    return os.path.abspath(os.fspath(output_dir))


def save_traced(model, values, output_dir, *, overwrite: bool = False, inputs=(), name: str = "graphprune_model") -> str:
    """Save a TracedModel with variables holding ``PassContext.value`` of each spec (pass-assigned
    values first, then ``values``, then initial values): a live variable of ``values`` that holds
    the value is saved itself (not copied; saving only reads it), any other value in a new one."""
    from graphprune.rebuild import new_variable, shared_variable

    context = PassContext(values=values)
    variables = {}
    for key, spec in model.variables.items():
        # A live variable holding the value is saved as it is (weights are not copied).
        shared = shared_variable(values, key, spec)
        variables[key] = shared if shared is not None else new_variable(
            context.value(model, key), name=key, dtype=spec.dtype, trainable=spec.trainable)
    return save(PrunableModel(model, variables, name=name, trace_now=False), output_dir, overwrite=overwrite,
                inputs=inputs)


def run_passes(target, passes: str, output_dir, *, overwrite: bool = False, verify: bool = False):
    """Run a text pass list on ``target`` and save the result; returns the PipelineResult."""
    inputs = [target] if isinstance(target, (str, os.PathLike)) else []
    check_output(output_dir, overwrite=overwrite, inputs=inputs)
    loaded = load(target)
    values = VariableValues(loaded.variables)
    result = run_pipeline(loaded.model, passes, PassContext(values=values), after_pass=optional_verifier(verify, values))
    save_traced(result.model, values, output_dir, overwrite=overwrite, inputs=inputs)
    return result
