"""The mask computation shared by one-shot pruning (eager) and the in-graph mask update.

One function computes every mask from the weights, so that what a one-shot prune gives and what
the update op gives during training cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from graphprune.channels import contracted_axes, rounding
from graphprune.config import WeightPlan
from graphprune.errors import DataError
from graphprune.masks import Chain, global_threshold, kept_count, mask_and_threshold, scores_for_global


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
    groups=(),
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
    channel_keys = [key for key in weights if plans[key].structure.channels]
    if channel_keys:
        results.update(_channel_masks({key: weights[key] for key in channel_keys}, plans, sparsities, alive, groups))
        for key in channel_keys:
            with chain.step():
                used = consume(key, *results[key]) if consume is not None else []
            chain.done(*(used or results[key]))
    for key, weight in weights.items():
        if key in results:
            continue
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


def _channel_masks(weights, plans, sparsities, alive, groups):
    """key -> (mask, threshold) for channel-structured weights.

    In every prunable channel group whose kernels are all among ``weights``, each channel is
    scored by the L2 (or L1) norm of its slices over every kernel of the group. A group's
    sparsity is its producing kernels' (the lowest where their rules differ). Layer-wise, a group
    keeps the kept_count of its channels with the largest scores; groups whose kernels are all
    ``in_global_group`` are ranked together instead: each group's scores divided by the mean over
    its live channels (groups of different widths and fan-ins compare), one k-th largest over all
    their channels at the sparsity, and each group keeps the channels at or above it (at least
    one). Either way the kept count is rounded up to the structure's ``round_to``. Each weight's
    mask is the product of its groups' channel masks along their axes; a weight in no such group
    keeps its current mask."""
    structure = plans[next(iter(weights))].structure
    values = {key: value * tf.cast(alive[key], value.dtype) if alive.get(key) is not None else value
              for key, value in weights.items()}
    ranked = []  # (group, members, scores, sparsity, global)
    for group, members in _pruned_groups(groups, weights):
        score = tf.add_n([channel_scores(values[m.name], m, structure.importance) for m in members])
        if structure.importance == "l2":
            score = tf.sqrt(score)
        producers = [m.name for m in members if m.role == "out"] or [m.name for m in members]
        sparsity = tf.reduce_min(tf.stack([tf.cast(sparsities[key], tf.float32) for key in producers]))
        ranked.append((group, members, score, sparsity, all(plans[m.name].in_global_group for m in members)))

    contracted = contracted_axes(groups)

    def rounded(group, count):
        multiple = int(rounding(group, structure.round_to, lambda m: weights[m.name].shape.as_list(), contracted))
        return tf.minimum(tf.constant(group.size, tf.int32), -(-tf.maximum(count, 1) // multiple) * multiple)

    shared = [item for item in ranked if item[4]]
    normalized, global_threshold_value = {}, None
    if shared:
        for group, _, score, _, _ in shared:
            live = tf.reduce_sum(tf.cast(score > 0, tf.float32))
            normalized[group.name] = tf.math.divide_no_nan(score, tf.reduce_sum(score) / tf.maximum(live, 1.0))
        everything = tf.concat([normalized[group.name] for group, *_ in shared], 0)
        k = kept_count(tf.size(everything), shared[0][3])
        global_threshold_value = tf.math.top_k(everything, k=k).values[-1]
    factors: dict[str, list] = {key: [] for key in weights}
    thresholds: dict[str, tf.Tensor] = {}
    for group, members, score, sparsity, in_global in ranked:
        if in_global:
            count = tf.reduce_sum(tf.cast(normalized[group.name] >= global_threshold_value, tf.int32))
            top, chosen = tf.math.top_k(normalized[group.name], k=rounded(group, count))
            threshold = global_threshold_value
        else:
            top, chosen = tf.math.top_k(score, k=rounded(group, kept_count(group.size, sparsity)))
            threshold = top[-1]
        keep = tf.scatter_nd(chosen[:, None], tf.ones_like(top), [group.size])
        for member in members:
            factors[member.name].append((member, keep))
            if member.role == "out" or member.name not in thresholds:
                thresholds[member.name] = threshold
    results = {}
    for key, value in weights.items():
        mask = tf.ones_like(value) if alive.get(key) is None else tf.cast(alive[key], value.dtype)
        for member, keep in factors[key]:
            mask = mask * expand_channels(tf.cast(keep, value.dtype), member, value.shape.as_list())
        threshold = thresholds.get(key, tf.zeros([], tf.float32))
        results[key] = (mask, tf.cast(threshold, value.dtype))
    return results


def _pruned_groups(groups, keys):
    """(group, its kernels among ``keys``) for each prunable group the channel masks prune: every
    kernel of it is a channel-structured weight (a skipped kernel keeps its group whole)."""
    for group in groups:
        if not group.prunable:
            continue
        members = group.weight_members(keys)
        kernels = [m for m in group.members if m.role != "param"]
        if members and all(m.kind == "variable" and m.name in keys for m in kernels):
            yield group, members


def channel_sparsity(masks: Mapping[str, tf.Tensor], groups):
    """The fraction of the channels of the groups the masks prune that are removed (every kernel's
    slice of the channel masked), over all those groups: what a channel schedule's target_sparsity
    measures, where the weights' own sparsity counts each kernel's rows and columns both. ``masks``:
    weight key -> its mask, for the channel-structured weights. None where no group is pruned."""
    removed, total = [], 0
    for group, members in _pruned_groups(groups, masks):
        # one kernel tells: a channel's mask multiplies every kernel of the group, and another group's
        # keeps at least one channel of each other axis; the smallest is read, once per call
        member = min(members, key=lambda m: masks[m.name].shape.num_elements() or 0)
        alive = channel_scores(tf.cast(masks[member.name], tf.float32), member, "l1") > 0
        removed.append(group.size - tf.reduce_sum(tf.cast(alive, tf.int32)))
        total += group.size
    if not total:
        return None
    return tf.cast(tf.add_n(removed), tf.float32) / float(total)


def channel_scores(value, member, importance: str = "l2"):
    """Per channel of ``member``'s group: the sum over its slice of ``value`` of |w| (l1) or w**2
    (l2; the caller takes the root of the group's sum)."""
    magnitude = tf.abs(value) if importance == "l1" else tf.square(value)
    rank = value.shape.rank
    per = tf.reduce_sum(tf.cast(magnitude, tf.float32), axis=[a for a in range(rank) if a != member.axis])
    if member.block is not None:  # a head: its block of values
        per = tf.reduce_sum(tf.reshape(per, [-1, member.block]), axis=1)
    if member.period is not None:
        per = tf.reduce_sum(tf.reshape(per, [-1, member.period]), axis=0)
    return per[member.start:member.stop]


def expand_channels(keep, member, shape):
    """The group's channel mask ``keep`` laid along ``member``'s axis of a weight of ``shape``:
    ones outside the member's slice, broadcastable against the weight."""
    dim = shape[member.axis]
    size = member.stop - member.start
    indices = member.indices(dim, np.arange(size))  # cycle by cycle, channel by channel, over its block
    values = keep if member.block is None else tf.repeat(keep, member.block)
    cycles = len(indices) // (size * (member.block or 1))
    values = tf.tile(values, [cycles]) if cycles > 1 else values
    vector = tf.tensor_scatter_nd_update(tf.ones([dim], keep.dtype), indices[:, None], values)
    return tf.reshape(vector, [dim if a == member.axis else 1 for a in range(len(shape))])
