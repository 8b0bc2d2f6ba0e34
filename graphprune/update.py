"""The mask computation shared by one-shot pruning (eager) and the in-graph mask update.

One function computes every mask from the weights, so that what a one-shot prune gives and what
the update op gives during training cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from graphprune.config import WeightPlan
from graphprune.errors import DataError
from graphprune.masks import Chain, global_threshold, mask_and_threshold, scores_for_global


_DIVERGED = "training diverged: lower the learning rate, clip gradients or check the data for NaN/Inf"
_IN_GRAPH_MESSAGE = re.compile(r"graphprune: weight \\?'(?P<key>[^'\\]*)\\?' has NaN or Inf values at the mask update "
                               r"of step\W*(?P<step>-?\d+)")


def check_finite(weights: Mapping[str, tf.Tensor], step=None) -> dict[str, tf.Tensor]:
    """The weights, refused if any holds NaN/Inf: a magnitude mask of such a weight means nothing.

    Eagerly (one-shot) a DataError now; in a graph (the update entry) an assertion that fails with
    a message naming the weight and the step (``diverged_error`` turns it into a DataError)."""
    if tf.executing_eagerly():
        for key, value in weights.items():
            array = np.asarray(value)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                count = int(array.size - np.count_nonzero(np.isfinite(array)))
                at = "" if step is None else f" at step {int(step)}"
                raise DataError(f"weight '{key}' has {count} NaN/Inf values{at}; {_DIVERGED}")
        return dict(weights)
    checked = {}
    for key, value in weights.items():
        if not value.dtype.is_floating:
            checked[key] = value
            continue
        message = f"graphprune: weight '{key}' has NaN or Inf values at the mask update of step"
        # raw Assert: tf.debugging.Assert would wrap itself in a cond (one more If per weight).
        check = tf.raw_ops.Assert(condition=tf.reduce_all(tf.math.is_finite(value)),
                                  data=[message, step if step is not None else -1, f"- {_DIVERGED}"], summarize=3)
        with tf.control_dependencies([check]):
            checked[key] = tf.identity(value)
    return checked


def diverged_error(error: BaseException) -> DataError | None:
    """The DataError for a failed in-graph finiteness check (see check_finite), else None."""
    match = _IN_GRAPH_MESSAGE.search(str(error))
    if match is None:
        return None
    return DataError(f"weight '{match.group('key')}' has NaN/Inf values at step {match.group('step')}; {_DIVERGED}")


def compute_masks(
    weights: Mapping[str, tf.Tensor],
    plans: Mapping[str, WeightPlan],
    sparsities: Mapping[str, tf.Tensor],
    input_axes: Mapping[str, int | None],
    alive: Mapping[str, tf.Tensor] | None = None,
    step=None,
    consume: Callable[[str, tf.Tensor, tf.Tensor], list] | None = None,
) -> dict[str, tuple[tf.Tensor, tf.Tensor]]:
    """key -> (mask, threshold) for the weights given.

    Weights whose plan is ``in_global_group`` share one threshold: the k-th largest over all their
    magnitudes (or block scores) at the sparsity of the first of them (they share a schedule),
    found by histograms summed over the weights, never by concatenating them. ``alive`` (current
    masks) keeps pruned elements pruned. Weights with NaN/Inf are refused (check_finite; ``step``
    names the step in the message).

    ``consume(key, mask, threshold)`` returns the ops that use one weight's result (the update's
    assigns). In a graph, every weight's computation runs after the previous weight's consumers
    (a Chain), so the extra memory of an update is a few times the largest weight's, not the
    model's: TensorFlow would otherwise compute every weight's temporaries at once.
    """
    alive = alive or {}
    chain = Chain()
    if tf.executing_eagerly():
        weights = check_finite(weights, step)
    else:  # one weight at a time (each check reads the whole weight)
        checked = {}
        for key, weight in weights.items():
            with chain.step():
                checked[key] = check_finite({key: weight}, step)[key]
            chain.done(checked[key])
        weights = checked
    group = [key for key in weights if plans[key].in_global_group]
    shared = None
    if group:
        def scores(key):
            structure = plans[key].structure
            return lambda: scores_for_global(weights[key], structure.block_size, structure.block_pooling,
                                             alive.get(key))

        shared = global_threshold([scores(key) for key in group], sparsities[group[0]], chain=chain)
    results = {}
    for key, weight in weights.items():
        structure = plans[key].structure
        with chain.step():
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
            used = consume(key, *results[key]) if consume is not None else []
        chain.done(*(used or results[key]))
    return results
