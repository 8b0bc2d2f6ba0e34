"""Magnitude masks as TF ops, with the reference toolkit's rule (shared/REFERENCE.md).

For n elements at target sparsity s:  k = max(round_half_to_even(n * (1 - s)), 1) elements are
kept; threshold = the k-th largest |w|; mask = |w| >= threshold (ties at the threshold are kept).

Blocks: |w| is pooled (AVG or MAX, stride = block) over (bh, bw) blocks of the 2-D view, the
rule picks blocks, and each decision is expanded back and cropped. A partial last block is scored
over its valid elements (SAME semantics) but anchored at the top-left, so the scored block is the
masked block (see _block_scores for where this differs from the reference). The 2-D view of a
rank-2 weight is itself; of a conv kernel [H, W, Cin, Cout] (any rank > 2) it is the im2col
matrix [H * W * Cin, Cout], so a 4x1 block spans 4 consecutive input rows of one output channel,
like a Dense [in, out] kernel.

M:N (e.g. 2:4, M pruned of every N): groups of N consecutive elements along the weight's input
axis keep their N - M largest |w|. A weight whose input axis is not a multiple of N is refused,
not padded (the reference pads and counts the padding as pruned).
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from graphprune.errors import StructureError
from graphprune.schedules import check_sparsity

POOLINGS = ("AVG", "MAX")

# Masks are stored as uint8 variables holding 0 or 1, one byte per element: a float32 mask the size
# of its weight doubled a prunable model's memory and its checkpoint (at 1B parameters, 4 GB more to
# hold and to write). The forward pass reads w * cast(mask, w.dtype); computed masks (the weight's
# dtype) are cast to the variable's when stored. Not bool: the gradient of a While nested in a
# While adds up gradients of every tensor its bodies read (AddN), and AddN has no bool kernel.
# Masks saved by earlier versions (the weight's dtype) are still read: every helper here takes
# any dtype.
MASK_DTYPE = "uint8"


def mask_dtype() -> str:
    """The dtype of new mask variables: MASK_DTYPE, or int32 under a strategy that creates
    variables by broadcasting their initial values with collective ops (MultiWorkerMirrored),
    which have no uint8 kernel."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return "int32"
    return MASK_DTYPE


def kept(mask):
    """Where ``mask`` keeps its weight, as bool (a numeric mask where != 0, a bool one as it is).
    TF tensors/variables or NumPy arrays."""
    if isinstance(mask, np.ndarray) or np.isscalar(mask):
        mask = np.asarray(mask)
        return mask if mask.dtype == np.bool_ else mask != 0
    return mask if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros([], mask.dtype))


def pruned_values(weight, mask):
    """The weight with its pruned elements set to +0.0 (TF tensors or NumPy arrays).

    Not ``weight * mask``: a pruned negative weight times 0 is -0.0, whose bytes (00 00 00 80)
    break the zero runs compressors live on. Half the zeros were negative; on the MNIST CNN at 90%
    (one-shot) the gzipped float .tflite went from 2,183,542 to 1,557,937 bytes with +0.0."""
    if isinstance(weight, np.ndarray) or np.isscalar(weight):
        weight = np.asarray(weight)
        return np.where(kept(np.asarray(mask)), weight, np.zeros((), weight.dtype)).astype(weight.dtype)
    return tf.where(kept(mask), weight, tf.zeros([], weight.dtype))  # no weight-sized zeros


_BITS = {2: tf.int16, 4: tf.int32, 8: tf.int64}


def store_pruned(weight, mask) -> None:
    """Make a weight variable hold exactly its pruned values (+0.0 where ``mask`` is 0), eagerly.

    A weight that holds them already (after a mask update, or a save) is only read, not written
    again: rewriting it would allocate and fill a new buffer of the weight's size for nothing
    (every weight of a 1B-parameter model, at each save)."""
    value = tf.convert_to_tensor(weight)
    bits = _BITS.get(value.dtype.size) if value.dtype.is_floating else None
    if bits is not None:  # any set bit where pruned (-0.0 included) needs the rewrite
        stray = tf.logical_and(tf.logical_not(kept(mask)), tf.not_equal(tf.bitcast(value, bits), 0))
        if not bool(tf.reduce_any(stray)):
            return
    del value
    weight.assign(pruned_values(weight, mask))


def kept_count(size, sparsity):
    """k = max(round_half_to_even(n * (1 - s)), 1), computed in float32 like the reference."""
    size = tf.cast(size, tf.float32)
    sparsity = tf.cast(sparsity, tf.float32)
    return tf.maximum(tf.constant(1, tf.int32), tf.cast(tf.math.round(size * (1.0 - sparsity)), tf.int32))


def kth_largest(values, sparsity):
    """The threshold: the k-th largest of ``values`` (non-negative, any shape) for the sparsity.

    Exact. float32 (and float16/bfloat16, widened, which keeps order exactly): a radix select on
    the IEEE bit patterns, which for non-negative floats sort like the values: a histogram of the
    high 16 bits finds the bin holding the k-th largest, a histogram of the low 16 bits inside
    that bin finds the value itself. Two counting passes (Bincount) instead of the 31 of a
    bisection: 273 ms -> 39 ms on 16.8M weights here (benchmarks/README.md, "Scale"). float64 keeps
    the bisection on 63-bit patterns.
    """
    flat = tf.reshape(values, [-1])
    if flat.dtype == tf.float64:
        return _kth_largest_bisection(flat, kept_count(tf.size(flat), sparsity))
    return kth_largest_of([lambda: flat], sparsity, flat.dtype)


_HIGH_BINS = 1 << 15  # the high 16 bits of a non-negative float32 (the sign bit is 0)
_LOW_BINS = 1 << 16


def _bits(values):
    flat = tf.reshape(values, [-1])
    return tf.bitcast(flat if flat.dtype == tf.float32 else tf.cast(flat, tf.float32), tf.int32)


def _count(indices, size):
    """How many of ``indices`` (int32) fall in each of [0, size); larger ones are not counted."""
    return tf.cast(tf.raw_ops.Bincount(arr=indices, size=size, weights=tf.zeros([0], tf.int32)), tf.int64)


def _high_histogram(values):
    """Counts of the high 16 bits of non-negative float ``values`` (32768 bins, int64)."""
    return _count(tf.bitwise.right_shift(_bits(values), 16), _HIGH_BINS)


def _low_histogram(values, high):
    """Counts of the low 16 bits of the ``values`` whose high 16 bits are ``high``: the others
    are shifted out of [0, 65536) (those below wrap to 2**31 and more) and not counted."""
    relative = _bits(values) - tf.cast(high, tf.int32) * _LOW_BINS
    return _count(tf.bitwise.bitwise_and(relative, 0x7FFFFFFF), _LOW_BINS)


def _select(histogram, k):
    """(the largest bin b with count(bins >= b) >= k, count(bins > b)); needs sum >= k >= 1."""
    suffix = tf.cumsum(histogram, reverse=True)
    bins = tf.range(tf.size(histogram, out_type=tf.int64), dtype=tf.int64)
    chosen = tf.reduce_max(tf.where(suffix >= k, bins, tf.constant(-1, tf.int64)))
    return chosen, tf.gather(suffix, chosen) - tf.gather(histogram, chosen)


def kth_largest_of(sources, sparsity, dtype=tf.float32, *, chain=None):
    """The k-th largest value over several tensors of non-negative floats taken together (k for
    their total count at ``sparsity``, as kept_count computes it), without concatenating them:
    ``sources`` are callables that each build (or recompute) one tensor, so a global threshold
    over a whole model needs memory for one weight at a time, not for the model. In a graph,
    ``chain`` (a Chain) runs each source after the previous one's histogram, so that TensorFlow
    does not compute them all at once."""
    chain = chain or Chain()

    def total(histogram_of):
        result = None
        for source in sources:
            with chain.step():
                histogram = histogram_of(source())
            chain.done(histogram)
            result = histogram if result is None else result + histogram
        return result

    highs = total(_high_histogram)
    k = tf.cast(kept_count(tf.reduce_sum(highs), sparsity), tf.int64)
    high, above = _select(highs, k)
    low, _ = _select(total(lambda values: _low_histogram(values, high)), k - above)
    bits = tf.cast(high * _LOW_BINS + low, tf.int32)
    return tf.cast(tf.bitcast(bits, tf.float32), dtype)


class Chain:
    """Runs groups of graph ops one after the other (control dependencies), so that the
    temporaries of one weight are freed before the next weight's are made; nothing when eager."""

    def __init__(self):
        self.last = []

    def step(self):
        if tf.executing_eagerly() or not self.last:
            return contextlib.nullcontext()
        return tf.control_dependencies(self.last)

    def done(self, *tensors):
        if not tf.executing_eagerly():
            self.last = [t for t in tensors if t is not None]


def _kth_largest_bisection(flat, k):
    """float64: the largest 63-bit pattern t with count(bits >= t) >= k, by bisection."""
    bits = tf.bitcast(flat, tf.int64)
    count_needed = tf.cast(k, tf.int64)

    def narrow(low, high):
        middle = low + (high - low + 1) // 2
        enough = tf.reduce_sum(tf.cast(bits >= middle, tf.int64)) >= count_needed
        return tf.where(enough, middle, low), tf.where(enough, high, middle - 1)

    low, _ = tf.while_loop(lambda low, high: low < high, narrow,
                           (tf.constant(0, tf.int64), tf.constant(0x7FF0000000000000, tf.int64)),
                           maximum_iterations=64)
    return tf.bitcast(low, tf.float64)


def as_matrix(tensor):
    """The 2-D view blocks are taken on: rank 2 as is, higher ranks as [prod(shape[:-1]), shape[-1]]."""
    rank = tensor.shape.rank
    if rank == 2:
        return tensor
    if rank is None or rank < 2:
        raise StructureError(f"block sparsity needs a weight of rank >= 2, got shape {tensor.shape}")
    return tf.reshape(tensor, [-1, tensor.shape[-1]])


def check_block(shape, block_size) -> None:
    bh, bw = block_size
    if bh < 1 or bw < 1:
        raise StructureError(f"block_size must be positive, got {bh}x{bw}")
    if (bh, bw) == (1, 1):
        return
    if len(shape) < 2:
        raise StructureError(f"block_size {bh}x{bw} needs a weight of rank >= 2, got shape {tuple(shape)}")
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    if bh > rows or bw > shape[-1]:
        raise StructureError(
            f"block_size {bh}x{bw} is larger than the weight's 2-D view {rows}x{shape[-1]} (shape {tuple(shape)}); "
            "use a smaller block or exclude this weight"
        )


def check_m_by_n(shape, m_by_n, axis, name="weight") -> None:
    m, n = m_by_n
    if not (0 < m < n):
        raise StructureError(f"m_by_n must be M:N with 0 < M < N, got {m}:{n}")
    if len(shape) < 2:
        raise StructureError(f"{name}: M:N needs a weight of rank >= 2 (an input-channel axis), got shape "
                             f"{tuple(shape)}; exclude it or use another structure")
    if axis is not None and not -len(shape) <= axis < len(shape):
        raise StructureError(f"{name}: input_axis {axis} is outside the weight's shape {tuple(shape)}")
    if axis is None:
        raise StructureError(f"{name}: M:N needs an input-channel axis, which this op ({name}) has not; exclude it")
    if shape[axis] % n:
        raise StructureError(
            f"{name}: input-channel count {shape[axis]} (axis {axis} of {tuple(shape)}) is not a multiple of N={n}; "
            f"exclude it (exclude=REGEX) or use another structure"
        )


def _block_scores(magnitude, block_size, pooling):
    """Pooled |w| per block of the 2-D view, blocks anchored at the top-left corner.

    As the reference pools (its factorized_pool): along rows over bh first, then along columns
    over bw, each average summed in order and divided by the number of valid elements, as
    TensorFlow's SAME average pooling does; so tied blocks stay tied exactly where they do there
    (a uniform weight keeps every block). A partial last block is scored over its valid elements
    only, but the padding goes at the end: TF's SAME padding centres it once a dimension is 2 or
    more short of a multiple of the block, which shifts every scored block against the block it
    masks (the reference toolkit has that misalignment). Where the view's dims are within one of
    a multiple of the block, this equals the reference exactly.
    """
    matrix = as_matrix(magnitude)
    bh, bw = block_size
    if pooling == "MAX":
        rows, cols = matrix.shape
        padded = tf.pad(matrix, [[0, -rows % bh], [0, -cols % bw]])[tf.newaxis, :, :, tf.newaxis]
        pooled = tf.nn.pool(padded, window_shape=[bh, bw], pooling_type="MAX", strides=[bh, bw], padding="VALID")
        return pooled[0, :, :, 0]
    return tf.transpose(_average_rows(tf.transpose(_average_rows(matrix, bh)), bw))


def _average_rows(matrix, block: int):
    """Means of ``block`` consecutive rows (the last group may be short), each summed in row order
    and divided by its row count: TensorFlow's average pooling's arithmetic, to the bit."""
    rows = matrix.shape[0]
    padded = tf.pad(matrix, [[0, -rows % block], [0, 0]])
    total = padded[0::block]
    for offset in range(1, block):
        total = total + padded[offset::block]  # + 0.0 where a short group ends: exact
    counts = np.minimum(block, rows - np.arange(0, rows, block)).astype(matrix.dtype.as_numpy_dtype)
    return total / tf.constant(counts[:, None])


def _expand_blocks(block_mask, block_size, shape):
    bh, bw = block_size
    rows = tf.repeat(tf.repeat(block_mask, bh, axis=0), bw, axis=1)
    matrix_rows = 1
    for dim in shape[:-1]:
        matrix_rows *= dim
    return tf.reshape(rows[:matrix_rows, : shape[-1]], shape)


def m_by_n_mask(magnitude, m_by_n, axis):
    """Keep the N - M largest of every N consecutive elements along ``axis``."""
    m, n = m_by_n
    rank = magnitude.shape.rank
    perm = [d for d in range(rank) if d != axis] + [axis]
    moved = tf.transpose(magnitude, perm)
    groups = tf.reshape(moved, [-1, n])
    _, indices = tf.math.top_k(groups, k=n - m)
    keep = tf.reduce_sum(tf.one_hot(indices, n, dtype=magnitude.dtype), axis=-2)
    inverse = [perm.index(d) for d in range(rank)]
    return tf.transpose(tf.reshape(keep, tf.shape(moved)), inverse)


def _never_all(threshold, scores):
    """A shared (global) threshold, lowered to this weight's largest score if it is above it: a
    global threshold must not prune a whole weight (layer collapse); layer-wise never does."""
    return tf.minimum(tf.cast(threshold, scores.dtype), tf.reduce_max(scores))


def mask_and_threshold(weight, sparsity, block_size=(1, 1), block_pooling="AVG", m_by_n=None, input_axis=None,
                       alive=None, threshold=None):
    """(mask, threshold) for one weight. ``alive`` (the current mask) keeps pruned elements pruned;
    a given ``threshold`` (global pruning) replaces the per-weight k-th largest."""
    weight = tf.convert_to_tensor(weight)
    magnitude = tf.abs(weight)
    if alive is not None:
        magnitude = magnitude * tf.cast(alive, magnitude.dtype)
    if m_by_n is not None:
        check_m_by_n(weight.shape.as_list(), m_by_n, input_axis)
        mask = m_by_n_mask(magnitude, m_by_n, input_axis)
        threshold = tf.zeros([], weight.dtype)
    elif tuple(block_size) != (1, 1):
        block_pooling = block_pooling.upper()
        if block_pooling not in POOLINGS:
            raise StructureError(f"block_pooling must be AVG or MAX, got {block_pooling!r}")
        check_block(weight.shape.as_list(), block_size)
        scores = _block_scores(magnitude, tuple(block_size), block_pooling)
        if threshold is None:
            threshold = kth_largest(scores, sparsity)
        else:
            threshold = _never_all(threshold, scores)
        block_mask = tf.cast(scores >= tf.cast(threshold, scores.dtype), weight.dtype)
        mask = _expand_blocks(block_mask, tuple(block_size), weight.shape.as_list())
    else:
        if threshold is None:
            threshold = kth_largest(magnitude, sparsity)
        else:
            threshold = _never_all(threshold, magnitude)
        threshold = tf.cast(threshold, magnitude.dtype)
        mask = tf.cast(magnitude >= threshold, weight.dtype)
        if alive is not None:
            # A pruned element's magnitude is 0 (above), below any positive threshold: only a
            # zero threshold needs the current mask applied again (one pass over the weight less).
            alive_mask = tf.cast(alive, weight.dtype)
            mask = tf.cond(threshold > 0, lambda: tf.identity(mask), lambda: mask * alive_mask)
        return mask, tf.cast(threshold, weight.dtype)
    if alive is not None:
        mask = mask * tf.cast(alive, weight.dtype)
    return tf.cast(mask, weight.dtype), tf.cast(threshold, weight.dtype)


def magnitude_mask(weight, sparsity, block_size=(1, 1), block_pooling="AVG", m_by_n=None, input_axis=None):
    """The mask (weight's dtype) zeroing the smallest-magnitude elements of ``weight``.

    ``m_by_n=(M, N)`` prunes M of every N elements along ``input_axis`` (default: the first axis
    of a rank-2 [in, out] weight, the second-to-last of a conv kernel [..., Cin, Cout]).
    """
    weight = tf.convert_to_tensor(weight)
    if not tf.is_tensor(sparsity) or tf.executing_eagerly():
        check_sparsity("sparsity", np.asarray(sparsity).item() if np.size(sparsity) == 1 else sparsity)
    if not weight.dtype.is_floating:
        raise StructureError(f"magnitude_mask needs a floating-point weight, got {weight.dtype.name}")
    from graphprune.config import parse_block_size, parse_m_by_n  # config imports this module

    block_size = parse_block_size(block_size)
    m_by_n = parse_m_by_n(m_by_n)
    if m_by_n is not None and input_axis is None and weight.shape.rank is not None and weight.shape.rank >= 2:
        input_axis = 0 if weight.shape.rank == 2 else weight.shape.rank - 2
    mask, _ = mask_and_threshold(weight, sparsity, block_size, block_pooling, m_by_n, input_axis)
    return mask


def global_threshold(scores: list, sparsity, chain=None):
    """One threshold across several weights' magnitudes (or block scores): tensors, or callables
    that build them (recomputed per pass, so memory is one weight's, not the model's)."""
    sources = [score if callable(score) else (lambda score=score: score) for score in scores]
    return kth_largest_of(sources, sparsity, tf.float32, chain=chain)


def scores_for_global(weight, block_size=(1, 1), block_pooling="AVG", alive=None):
    """What a weight contributes to a global threshold: |w| or its pooled block scores."""
    magnitude = tf.abs(tf.convert_to_tensor(weight))
    if alive is not None:
        magnitude = magnitude * tf.cast(alive, magnitude.dtype)
    if tuple(block_size) != (1, 1):
        return _block_scores(magnitude, tuple(block_size), block_pooling.upper())
    return magnitude
