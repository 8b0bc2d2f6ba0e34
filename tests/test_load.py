"""The loader's edge cases and the private TF helper it relies on."""

import tensorflow as tf

import testmodels
from graphprune.load import inline_functions, load


def test_inline_helper_is_available():
    """graphprune inlines function calls with TF's convert_to_constants helper (private API).

    Known to work on TF 2.16 - 2.21; if this fails on a newer TF, graphprune.load needs a new
    inliner before anything else works."""
    module = testmodels.CNN()
    graph_def = inline_functions(module.__call__.get_concrete_function())
    ops = {node.op for node in graph_def.node}
    assert "Conv2D" in ops and "DepthwiseConv2dNative" in ops  # the nested tf.function is inlined
    assert not ops & {"StatefulPartitionedCall", "PartitionedCall"}


def test_generic_variable_names_become_attribute_paths():
    class Unnamed(tf.Module):
        def __init__(self):
            super().__init__()
            self.first = tf.Variable(tf.ones([3, 3]))
            self.second = tf.Variable(tf.ones([3, 3]))

        @tf.function(input_signature=[tf.TensorSpec([1, 3], tf.float32)])
        def __call__(self, x):
            return tf.matmul(tf.matmul(x, self.first), self.second)

    loaded = load(Unnamed())
    assert sorted(loaded.variables) == ["first", "second"]


def test_captured_eager_constants_become_consts():
    table = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    weight = tf.Variable(tf.eye(2))

    @tf.function(input_signature=[tf.TensorSpec([1, 2], tf.float32)])
    def f(x):
        return tf.matmul(x, weight) + tf.reduce_sum(table)

    loaded = load(f)
    assert list(loaded.model.entries[0].resources.values()) == [next(iter(loaded.variables))]
