"""Masks follow the reference rule exactly, for every structure (shared/REFERENCE.md)."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from graphprune.masks import mask_and_threshold


def _reference_mask(weight, sparsity):
    """The rule, written independently in NumPy."""
    magnitude = np.abs(weight).ravel()
    k = max(int(np.round(np.float32(magnitude.size) * (np.float32(1) - np.float32(sparsity)))), 1)
    threshold = np.sort(magnitude)[::-1][k - 1]
    return (np.abs(weight) >= threshold).astype(weight.dtype), threshold


def test_reference_example():
    weight = np.random.RandomState(0).randn(64, 32).astype(np.float32)
    mask, threshold = mask_and_threshold(weight, 0.75)
    assert int(np.sum(mask.numpy() == 0)) == 1536
    assert float(threshold) == pytest.approx(1.1172835, abs=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("shape", [(7,), (33, 17), (3, 3, 8, 5)])
def test_unstructured_equals_rule(shape, sparsity):
    weight = np.random.RandomState(len(shape)).randn(*shape).astype(np.float32)
    expected, _ = _reference_mask(weight, sparsity)
    np.testing.assert_array_equal(graphprune.magnitude_mask(weight, sparsity).numpy(), expected)


def test_ties_at_threshold_are_kept_and_at_least_one_survives():
    weight = np.array([1.0, 1.0, 1.0, 0.5], np.float32)
    np.testing.assert_array_equal(graphprune.magnitude_mask(weight, 0.5).numpy(), [1, 1, 1, 0])
    assert graphprune.magnitude_mask(np.ones(3, np.float32) * [1, 2, 3], 0.999).numpy().sum() == 1


def _reference_block_mask(weight, sparsity, block, pooling):
    """Blocks in NumPy: pool |w| with SAME padding (AVG over valid elements), rule, expand, crop."""
    bh, bw = block
    rows, cols = weight.shape
    grid = np.zeros(((rows + bh - 1) // bh, (cols + bw - 1) // bw), np.float32)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            window = np.abs(weight[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw])
            grid[i, j] = window.mean() if pooling == "AVG" else window.max()
    block_mask, _ = _reference_mask(grid, sparsity)
    return np.kron(block_mask, np.ones(block, np.float32))[:rows, :cols]


@pytest.mark.parametrize("block", [(1, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_masks_equal_rule(block, pooling):
    weight = np.random.RandomState(1).randn(30, 18).astype(np.float32)
    expected = _reference_block_mask(weight, 0.6, block, pooling)
    actual = graphprune.magnitude_mask(weight, 0.6, block_size=block, block_pooling=pooling).numpy()
    np.testing.assert_array_equal(actual, expected)
    # every block is all-kept or all-pruned
    bh, bw = block
    blocks = actual[: 30 // bh * bh, : 18 // bw * bw].reshape(30 // bh, bh, 18 // bw, bw)
    assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))


def test_block_mask_on_conv_kernel_uses_im2col_view():
    kernel = np.random.RandomState(2).randn(3, 3, 4, 6).astype(np.float32)
    expected = _reference_block_mask(kernel.reshape(36, 6), 0.5, (4, 1), "AVG").reshape(kernel.shape)
    actual = graphprune.magnitude_mask(kernel, 0.5, block_size=(4, 1)).numpy()
    np.testing.assert_array_equal(actual, expected)


def test_two_four_dense_and_conv():
    dense = np.random.RandomState(3).randn(16, 8).astype(np.float32)
    mask = graphprune.magnitude_mask(dense, 0.0, m_by_n=(2, 4)).numpy()
    groups_mask = mask.T.reshape(8, 4, 4)  # along axis 0 (input channels)
    groups_weight = np.abs(dense).T.reshape(8, 4, 4)
    assert np.all(groups_mask.sum(axis=-1) == 2)
    kept_min = np.where(groups_mask == 1, groups_weight, np.inf).min(axis=-1)
    pruned_max = np.where(groups_mask == 0, groups_weight, -np.inf).max(axis=-1)
    assert np.all(kept_min >= pruned_max)
    conv = np.random.RandomState(4).randn(3, 3, 8, 2).astype(np.float32)
    conv_mask = graphprune.magnitude_mask(conv, 0.0, m_by_n=(2, 4)).numpy()
    assert np.all(np.moveaxis(conv_mask, 2, -1).reshape(-1, 4).sum(axis=-1) == 2)


def test_m_by_n_refuses_channels_not_multiple_of_n():
    with pytest.raises(graphprune.StructureError, match="not a multiple of N=4"):
        graphprune.magnitude_mask(np.ones((6, 3), np.float32), 0.0, m_by_n=(2, 4))


def test_block_larger_than_weight_refused():
    with pytest.raises(graphprune.StructureError, match="larger than the weight"):
        graphprune.magnitude_mask(np.ones((2, 3), np.float32), 0.5, block_size=(4, 1))


def test_alive_mask_never_revives():
    weight = np.random.RandomState(5).randn(10, 10).astype(np.float32)
    alive = (np.random.RandomState(6).uniform(size=(10, 10)) > 0.5).astype(np.float32)
    mask, _ = mask_and_threshold(weight, 0.2, alive=alive)
    assert np.all(mask.numpy()[alive == 0] == 0)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
def test_other_float_dtypes(dtype):
    weight = tf.cast(np.random.RandomState(7).randn(20, 10), dtype)
    mask = graphprune.magnitude_mask(weight, 0.5)
    assert mask.dtype == dtype
    assert int(tf.reduce_sum(tf.cast(mask, tf.int32))) == 100


def _reference_factorized_pool(x, block):
    """The reference toolkit's factorized_pool (rows over bh, then columns over bw, SAME)."""
    height, width = x.shape
    pooled = tf.nn.pool(tf.reshape(x, [1, 1, height, width]), window_shape=[1, block[0]], pooling_type="AVG",
                        strides=[1, block[0]], padding="SAME")
    pooled = tf.nn.pool(tf.transpose(pooled, [0, 1, 3, 2]), window_shape=[1, block[1]], pooling_type="AVG",
                        strides=[1, block[1]], padding="SAME")
    return tf.transpose(pooled, [0, 1, 3, 2])[0, 0]


@pytest.mark.parametrize("shape, block", [((15, 5), (4, 2)), ((64, 32), (4, 4)), ((31, 9), (2, 3)),
                                          ((16, 16), (1, 4)), ((9, 12), (2, 1)), ((5, 5), (5, 5))])
def test_avg_block_scores_equal_the_references_to_the_bit(shape, block):
    from graphprune.masks import _block_scores

    x = np.abs(np.random.RandomState(sum(shape)).randn(*shape)).astype(np.float32)
    ours = _block_scores(tf.constant(x), block, "AVG").numpy()
    np.testing.assert_array_equal(ours, _reference_factorized_pool(tf.constant(x), block).numpy().reshape(ours.shape))


def test_tied_blocks_split_as_the_reference_splits_them():
    # The reference keeps all 75 (every block scores exactly 0.1); pooling over 4x2 at once does not.
    mask = graphprune.magnitude_mask(np.full((15, 5), 0.1, np.float32), 0.5, block_size=(4, 2))
    assert int(np.sum(mask)) == 75
