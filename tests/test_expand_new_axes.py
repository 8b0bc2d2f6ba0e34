"""expand_new_axes: StridedSlices that add axes (x[:, None]) as a slice without them and
ExpandDims, so that TFLite's converter takes models it refused on dynamic shapes (every keras-hub
decoder's attention mask; test_real_models runs them through LiteRT).

Each model is rewritten, saved, reloaded by TensorFlow alone and run on inputs of several shapes
against the original: the outputs must be equal, bit for bit."""

import numpy as np
import pytest
import tensorflow as tf

import testmodels
from graphprune import graph as g

RNG = np.random.RandomState(0)


class Slices(tf.Module):
    """New axes in every place a slice spec can put them, on inputs of unknown shape."""

    def __init__(self):
        self.scale = tf.Variable(RNG.randn(5).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 5], tf.float32), tf.TensorSpec([], tf.int32)])
    def __call__(self, x, start):
        @tf.function
        def inner(t):  # a body at depth 2
            return t[:, None, ::-1] * self.scale

        return {
            "front": x[None],  # new axes only: no slice left
            "second": x[:, None, :, :],  # keras-hub's attention mask
            "last": x[..., None],  # after an ellipsis: counted from the back
            "both_sides": x[None, ..., None],
            "sliced": x[:, None, 1:, ::2],  # a real slice stays, without the new axis
            "shrunk": x[0, None, :, 1],  # shrinks before and after a new axis
            "ellipsis_between": x[None, 1:, ..., None, 2:4],
            "two_in_a_row": x[:, None, None, -1],
            "apart": x[None, :, None],  # the second's place counts the first
            "negative": x[::-1, None, -2:],
            "nested": inner(x),
            "dynamic": x[start:, None],  # bounds from an input: left as it is
        }


def _new_axis_slices(model) -> int:
    count = 0
    for entry in model.entries:
        graph = entry.graph_def
        for nodes in [graph.node] + [f.node_def for f in graph.library.function]:
            count += sum(1 for n in nodes if n.op == "StridedSlice" and n.attr["new_axis_mask"].i)
    return count


def test_every_new_axis_becomes_expand_dims_with_outputs_equal_bit_for_bit(tmp_path):
    module = Slices()
    step, model, rewritten = testmodels.one_pass(tmp_path, module, "expand_new_axes")
    assert step.changed
    # all but the slice whose bounds an input gives, in the top graph and at depth 2, in each entry
    # (the signature and the method)
    assert _new_axis_slices(model) == len(model.entries) == 2
    counts = {}
    for entry in model.entries:
        for op, n in g.op_counts(entry.graph_def).items():
            counts[op] = counts.get(op, 0) + n
    assert counts["ExpandDims"] >= 15
    for shape in ([3, 4, 5], [1, 6, 5], [2, 2, 5]):
        x = tf.constant(RNG.randn(*shape).astype(np.float32))
        for start in (0, 1):
            want = module(x, tf.constant(start))
            got = rewritten(x, tf.constant(start))
            assert sorted(got) == sorted(want)
            for name in want:
                assert got[name].shape == want[name].shape, name
                np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def test_a_model_without_new_axes_is_unchanged(tmp_path):
    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return x[:, 1:3] * 2.0

    step, _, _ = testmodels.one_pass(tmp_path, Plain(), "expand_new_axes")
    assert not step.changed and step.report == {"rewritten": []}


class Mask(tf.Module):
    """A keras-hub decoder's attention mask on its own: [batch, query, key] -> [batch, 1, query, key]
    on dynamic shapes, which TFLite's converter refuses as a StridedSlice with a new axis."""

    def __init__(self):
        self.kernel = tf.Variable(RNG.randn(4, 4).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32),
                                  tf.TensorSpec([None, None, None], tf.int32)])
    def __call__(self, x, mask):
        scores = tf.einsum("bqd,bkd->bqk", tf.matmul(x, self.kernel), x)[:, None, :, :]
        return tf.nn.softmax(tf.where(mask[:, None, :, :] > 0, scores, -1e9), axis=-1)


@pytest.mark.slow
def test_export_tflite_converts_a_model_the_converter_refused_and_leaves_the_input_alone(tmp_path):
    module = Mask()
    runner = testmodels.refused_then_converted(tmp_path, module, "StridedSlice")
    x = RNG.randn(2, 3, 4).astype(np.float32)
    mask = (RNG.rand(2, 3, 3) > 0.3).astype(np.int32)
    want = module(x, mask).numpy()
    got = next(iter(runner(x=x, mask=mask).values()))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
