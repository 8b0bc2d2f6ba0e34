"""The loader's edge cases and the private TF helper it relies on."""

import numpy as np
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


def _compiled_square_op(directory):
    """tests/square_op.cc built against this TensorFlow; its path (a skip where no C++ compiler is)."""
    import os
    import shutil
    import subprocess

    import pytest

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build a custom op with")
    library = str(directory / "square_op.so")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "square_op.cc")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-w", source, "-o", library, *tf.sysconfig.get_compile_flags(),
                    *tf.sysconfig.get_link_flags()], check=True, capture_output=True, timeout=600)
    return library


class _Squared(tf.Module):
    def __init__(self, square):
        super().__init__()
        rng = np.random.RandomState(0)
        self.square = square
        self.hidden = tf.Variable(rng.standard_normal([8, 16]).astype(np.float32) * 0.3, name="hidden/kernel")
        self.head = tf.Variable(rng.standard_normal([16, 4]).astype(np.float32) * 0.3, name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        return self.square(x @ self.hidden) @ self.head


def test_a_model_with_compiled_ops_goes_through_the_cli_with_op_library(tmp_path):
    """A SavedModel that uses a user's compiled op: every command runs in a process that has not
    loaded it. Without --op_library the error says how to give it (one line, exit 2, nothing
    written); with it the model is pruned, finalized, and computes the masked model. A library that
    is not there, or not a library, is one line too."""
    import json

    from test_cli import graphprune as cli

    library = _compiled_square_op(tmp_path)
    square = tf.load_op_library(library).graphprune_test_square
    tf.saved_model.save(_Squared(square), str(tmp_path / "model"))
    prune = ["prune", f"--input={tmp_path / 'model'}", f"--output={tmp_path / 'pruned'}", "--final_sparsity=0.5",
             "--one_shot"]
    done = cli(*prune, check=False)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-3000:]
    assert "uses op 'GraphpruneTestSquare', which this TensorFlow does not have" in done.stderr
    assert "--op_library=PATH.so" in done.stderr and not (tmp_path / "pruned").exists()
    cli(*prune, f"--op_library={library}")
    cli("finalize", f"--input={tmp_path / 'pruned'}", f"--output={tmp_path / 'final'}", f"--op_library={library}")
    x = tf.constant(np.random.RandomState(1).standard_normal([4, 8]).astype(np.float32))
    masked = tf.saved_model.load(str(tmp_path / "pruned"))(x).numpy()
    final = tf.saved_model.load(str(tmp_path / "final"))
    np.testing.assert_allclose(final(x).numpy(), masked, atol=1e-6 * np.abs(masked).max(), rtol=0)
    report = json.loads(cli("inspect", f"--input={tmp_path / 'final'}", "--json", f"--op_library={library}").stdout)
    assert [weight["sparsity"] for weight in report["weights"]] == [0.5, 0.5]
    (tmp_path / "not_a_library.so").write_text("text")
    for flag, message in ((str(tmp_path / "missing.so"), "no such file"),
                          ("graphprune_no_such_module", "no such module installed"),
                          (str(tmp_path / "not_a_library.so"), "TensorFlow cannot load it")):
        done = cli(*prune[:2], f"--output={tmp_path / 'pruned2'}", *prune[3:], f"--op_library={flag}", check=False)
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-3000:]
        assert f"--op_library={flag}: {message}" in done.stderr and not (tmp_path / "pruned2").exists()
