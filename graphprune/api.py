"""The public entry points: prune a model, save it."""

from __future__ import annotations

import os

import tensorflow as tf

from graphprune.config import PruningConfig, Rule, Structure
from graphprune.errors import NoPrunableWeightsError
from graphprune.io import atomic_directory
from graphprune.load import load
from graphprune.model import PrunableModel
from graphprune.pipeline import PassContext, VariableValues, run_pipeline


def prune(target, schedule=None, *, block_size=(1, 1), block_pooling="AVG", m_by_n=None, scope="layer", rules=(),
          exclude=None, one_shot=False, config: PruningConfig | None = None, verify=False) -> PrunableModel:
    """Rewrite ``target`` so that its MatMul/Conv/Einsum weights are masked and prunable.

    target: a SavedModel directory, a tf.Module, a tf.function with input_signature or a
        ConcreteFunction. A SavedModel on disk is only read.
    schedule: graphprune.PolynomialDecay / ConstantSparsity. With None, masks are inserted (all
        ones) without a step or mask update.
    block_size, block_pooling, m_by_n: the mask structure ((1, 2) blocks, "AVG"/"MAX", (2, 4)).
    scope: "layer" (a threshold per weight) or "global" (one threshold across weights).
    rules: graphprune.Rule overrides by regex (skip, own sparsity, own structure);
        ``exclude=REGEX`` is a shortcut for a skip rule.
    one_shot: prune to the schedule's final sparsity now (masks set, pruned weights zeroed).
    verify: after every pass, rebuild and compare outputs with the previous stage (all-ones masks).
    """
    loaded = load(target)
    if config is None and schedule is not None:
        all_rules = ([Rule(exclude, skip=True)] if exclude else []) + list(rules)
        config = PruningConfig(schedule, Structure(block_size, block_pooling, m_by_n), scope, tuple(all_rules))
    elif config is None:
        from graphprune.schedules import ConstantSparsity

        masks_only = PruningConfig(ConstantSparsity(0.0, 0), Structure(block_size, block_pooling, m_by_n), scope,
                                   tuple(([Rule(exclude, skip=True)] if exclude else []) + list(rules)))
    steps = [("find_weights", {}), ("insert_masks", {"config": config if config is not None else masks_only})]
    if config is not None:
        steps.append(("insert_mask_updates", {"config": config}))
    context = PassContext(values=VariableValues(loaded.variables))
    after_pass = None
    if verify:
        from graphprune.verify import Verifier

        after_pass = Verifier(context.values)
    result = run_pipeline(loaded.model, steps, context, after_pass=after_pass)
    model = result.model
    if not any(w.mask for w in model.facts.get("weights", ())):
        skipped = model.facts.get("skipped_weights") or {}
        detail = f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""
        raise NoPrunableWeightsError(
            f"{loaded.source}: no weight read by MatMul, BatchMatMul, Conv2D/3D, DepthwiseConv2dNative, "
            f"Conv2DBackpropInput or Einsum{detail}; nothing to prune (check the rules/exclude pattern)"
        )
    prunable = PrunableModel(model, loaded.variables, config=config)
    prunable._graphprune.owner = loaded.owner  # keeps a loaded SavedModel's objects alive
    prunable._graphprune.pipeline = result
    prunable._graphprune.verify_report = after_pass.report if verify else None
    if one_shot:
        prunable.prune_now()
    return prunable


def save(model, output_dir, *, overwrite: bool = False) -> str:
    """Write ``model`` (a PrunableModel) as a SavedModel with the original signatures, atomically."""
    signatures = dict(model.signatures)
    if not signatures:
        state = model._graphprune
        signatures = {"serving_default": state.concrete[state.default_name]}
    with atomic_directory(output_dir, overwrite=overwrite) as temp:
        tf.saved_model.save(model, temp, signatures=signatures)
    return os.path.abspath(os.fspath(output_dir))
