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


def test_tf_functions_set_on_the_instance_are_entries(tmp_path):
    """A tf.function set on the module (``self.serve = tf.function(...)``, the way to give a wrapped
    model a signature built at run time) was not found: "has no tf.function with an
    input_signature". tf.saved_model.save exports such functions, and graphprune now takes them,
    beside the class's own methods; one without a signature is skipped, traced or not."""
    import numpy as np

    import graphprune

    class Wrapped(tf.Module):
        def __init__(self, width):
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal([4, width], seed=[1, 2]), name="kernel")
            self.serve = tf.function(lambda x: tf.matmul(x, self.kernel), input_signature=[tf.TensorSpec([2, 4])])
            self.untraced = tf.function(lambda x: x)
            self.traced = tf.function(lambda x: x * 2.0)  # traced, no signature: as tf-keras's train_function
            self._private = tf.function(lambda x: x, input_signature=[tf.TensorSpec([2, 4])])

    module = Wrapped(6)
    module.traced(tf.ones([2, 4]))
    assert [entry.name for entry in load(module).model.entries if entry.kind != "update"] == ["serve"]
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    x = np.random.RandomState(0).standard_normal([2, 4]).astype(np.float32)
    masked = pm.serve(x).numpy()
    assert np.count_nonzero(pm.masks[0].numpy()) == 12
    loaded = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(loaded.serve(x).numpy(), masked, rtol=1e-6, atol=1e-6)
