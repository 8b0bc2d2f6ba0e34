"""The mask computation shared by one-shot pruning (eager) and the in-graph mask update.

One function computes every mask from the weights, so that what a one-shot prune gives and what
the update op gives during training cannot drift apart.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from graphprune.config import WeightPlan
from graphprune.masks import global_threshold, mask_and_threshold, scores_for_global


def compute_masks(
    weights: Mapping[str, tf.Tensor],
    plans: Mapping[str, WeightPlan],
    sparsities: Mapping[str, tf.Tensor],
    input_axes: Mapping[str, int | None],
    alive: Mapping[str, tf.Tensor] | None = None,
) -> dict[str, tuple[tf.Tensor, tf.Tensor]]:
    """key -> (mask, threshold) for the weights given.

    Weights whose plan is ``in_global_group`` share one threshold: the k-th largest over all their
    magnitudes (or block scores) at the sparsity of the first of them (they share a schedule).
    ``alive`` (current masks) keeps pruned elements pruned.
    """
    alive = alive or {}
    group = [key for key in weights if plans[key].in_global_group]
    shared = None
    if group:
        scores = [
            scores_for_global(weights[key], plans[key].structure.block_size, plans[key].structure.block_pooling,
                              alive.get(key))
            for key in group
        ]
        shared = global_threshold(scores, sparsities[group[0]])
    results = {}
    for key, weight in weights.items():
        structure = plans[key].structure
        results[key] = mask_and_threshold(
            weight,
            sparsities[key],
            block_size=structure.block_size,
            block_pooling=structure.block_pooling,
            m_by_n=structure.m_by_n,
            input_axis=input_axes.get(key),
            alive=alive.get(key),
            threshold=shared if key in group else None,
        )
    return results
