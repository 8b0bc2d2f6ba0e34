"""Each private TensorFlow API graphprune uses (graphprune/compat.py) still does what we rely on.

A failure here names the TensorFlow version and the API that moved: fix compat.py, nothing else.
"""

import numpy as np
import pytest
import tensorflow as tf

from graphprune import compat


def _context(api):
    return f"TensorFlow {tf.__version__}: {api} no longer behaves as graphprune relies on (graphprune/compat.py)"


class _Model(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.ones([3, 2], np.float32), name="w")
        self.inner = tf.function(lambda x: tf.matmul(x, self.w))

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, x):
        h = self.inner(x)
        return tf.while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, h * 2.0), (0, h))[1]


_KEEP = []


def _concrete():
    model = _Model()
    _KEEP.append(model)  # a tf.function method holds its module weakly
    return model.__call__.get_concrete_function()


def test_inline_functions_flattens_calls_and_keeps_loops():
    graph_def = compat.inline_functions(_concrete())
    ops = {node.op for node in graph_def.node}
    assert "MatMul" in ops and "ReadVariableOp" in ops, _context("the function inliner")
    assert not ops & {"PartitionedCall", "StatefulPartitionedCall"}, _context("the function inliner")
    assert ops & {"While", "StatelessWhile"} and graph_def.library.function, _context("the function inliner")


def test_register_function_def_makes_a_body_callable_by_name():
    graph_def = compat.inline_functions(_concrete())
    function_def = graph_def.library.function[0]
    compat.register_function_def(function_def)
    compat.register_function_def(function_def)  # idempotent
    from tensorflow.python.eager import context

    assert context.context().has_function(function_def.signature.name), _context("context.add_function_def")


def test_trackable_children_and_traced_functions(tmp_path):
    model = _Model()
    model(tf.ones([1, 3]))
    assert {"w", "inner"} <= set(compat.trackable_children(model)), _context("_trackable_children")
    plain = tf.Module()
    plain.w = tf.Variable(np.ones([3, 2], np.float32))
    plain.f = tf.function(lambda x: tf.matmul(x, plain.w), input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    tf.saved_model.save(plain, str(tmp_path / "m"))
    restored = compat.trackable_children(tf.saved_model.load(str(tmp_path / "m")))
    assert {"w", "f"} <= set(restored), _context("_trackable_children of a loaded SavedModel")
    assert compat.trackable_children(object()) == {}
    traced = compat.traced_concrete_functions(model.__call__)
    assert len(traced) == 1 and traced[0].structured_input_signature, _context("_list_all_concrete_functions")


def test_capture_and_watch_variable_give_gradients_inside_a_function():
    variable = tf.Variable(2.0)

    @tf.function
    def f():
        graph = tf.compat.v1.get_default_graph()
        handle = compat.capture(graph, variable.handle)
        compat.watch_variable(graph, variable)
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32) ** 2

    with tf.GradientTape() as tape:
        value = f()
    assert float(value) == 4.0
    assert tape.gradient(value, variable) is not None, _context("FuncGraph.watch_variable")


def test_capture_outside_a_function_is_the_tensor_itself():
    with tf.Graph().as_default() as graph:
        tensor = tf.constant(1.0)
        assert compat.capture(graph, tensor) is tensor


def test_op_def_names_output_arguments():
    assert [arg.name for arg in compat.op_def("ReadVariableOp").output_arg] == ["value"], _context("op_def_registry")
    assert [arg.name for arg in compat.op_def("Mul").output_arg] == ["z"], _context("op_def_registry")
    assert compat.op_def("NoSuchOpAnywhere") is None


def test_tflite_schema_reads_a_model(tmp_path):
    schema = compat.tflite_schema()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf.function(lambda x: x * 2.0).get_concrete_function(tf.TensorSpec([1, 2], tf.float32))])
    data = converter.convert()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    assert model.subgraphs, _context("tensorflow.lite.python.schema_py_generated")


def test_a_moved_api_is_one_line_naming_the_version(monkeypatch):
    from tensorflow.python.framework import convert_to_constants

    monkeypatch.delattr(convert_to_constants, "_run_inline_graph_optimization")
    with pytest.raises(compat.UnsupportedError, match=rf"TensorFlow \({tf.__version__}\) lacks"):
        compat.inline_functions(_concrete())
