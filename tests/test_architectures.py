"""Real architectures: RNN kernels in While bodies, attention (Einsum weights), transposed and 3-D
convolutions, a Keras embedding (opt-in lookup target); each as a SavedModel built here, with all-ones equivalence, training to a target,
finalize and TFLite (run with LiteRT). The zoo models are slow and marked so."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import graphprune


class LoopRNN(tf.Module):
    """A plain tf.Module RNN written with tf.while_loop: both kernels are read inside the body."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kernel = tf.Variable(rng.standard_normal([4, 8]).astype(np.float32) * 0.4, name="rnn/kernel")
        self.recurrent = tf.Variable(rng.standard_normal([8, 8]).astype(np.float32) * 0.3, name="rnn/recurrent_kernel")
        self.readout = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32) * 0.3, name="readout/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 4], tf.float32)])
    def __call__(self, x):
        def body(t, h):
            return t + 1, tf.tanh(tf.matmul(x[:, t], self.kernel) + tf.matmul(h, self.recurrent))

        _, h = tf.while_loop(lambda t, h: t < 6, body, (0, tf.zeros([tf.shape(x)[0], 8])))
        return tf.matmul(h, self.readout)


def _keras(build, shape, dtype="float32"):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape, name="inputs", dtype=dtype)
    return keras.Model(inputs, build(keras, inputs))


def _embedding_classifier(k, i):
    return k.layers.Dense(3)(k.layers.GlobalAveragePooling1D()(k.layers.Embedding(VOCABULARY, 6)(i)))


VOCABULARY = 20


ARCHITECTURES = {
    "loop_rnn": (None, (6, 4), 3),
    "lstm": (lambda k, i: k.layers.Dense(3)(k.layers.LSTM(8)(i)), (6, 4), 3),
    "gru": (lambda k, i: k.layers.Dense(3)(k.layers.GRU(8)(i)), (6, 4), 3),
    "bidirectional_lstm": (lambda k, i: k.layers.Dense(3)(k.layers.Bidirectional(k.layers.LSTM(8))(i)), (6, 4), 5),
    "multi_head_attention": (lambda k, i: k.layers.MultiHeadAttention(2, 4)(i, i), (5, 8), 4),
    "conv2d_transpose": (lambda k, i: k.layers.Conv2DTranspose(4, 3, strides=2)(i), (6, 6, 3), 1),
    "conv3d": (lambda k, i: k.layers.Conv3D(4, 3)(i), (5, 5, 5, 2), 1),
    "conv3d_transpose": (lambda k, i: k.layers.Conv3DTranspose(4, 3, strides=2)(i), (3, 3, 3, 2), 1),
    # The table is only looked up (ResourceGather): a target only with include_gather=True.
    "embedding": (_embedding_classifier, (7,), 2),
}
PRUNE_OPTIONS = {"embedding": {"include_gather": True}}
INTEGER_INPUTS = {"embedding": VOCABULARY}


KERAS_RECURRENT = ("lstm", "gru", "bidirectional_lstm")


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request, tmp_path_factory):
    build, shape, kernels = ARCHITECTURES[request.param]
    path = str(tmp_path_factory.mktemp(request.param) / "saved_model")
    if build is None:
        model = LoopRNN()
        tf.saved_model.save(model, path, signatures={"serving_default": model.__call__})
        reference = model
    else:
        keras_model = _keras(build, shape, "int32" if request.param in INTEGER_INPUTS else "float32")
        keras_model.export(path, verbose=False)
        reference = keras_model
    if request.param in INTEGER_INPUTS:
        x = np.random.RandomState(1).randint(0, INTEGER_INPUTS[request.param], [2, *shape]).astype(np.int32)
    else:
        x = np.random.RandomState(1).standard_normal([2, *shape]).astype(np.float32)
    return request.param, path, reference, x, kernels


def _call(model, x):
    output = model(x) if callable(model) else model.serve(x)
    return np.asarray(output)


def test_all_ones_equivalence_and_every_kernel_found(architecture):
    name, path, reference, x, kernels = architecture
    pm = graphprune.prune(path, **PRUNE_OPTIONS.get(name, {}))
    np.testing.assert_allclose(np.asarray(pm.signatures["serving_default"](**{_input(pm): x})[_output(pm)]),
                               _call(reference, x), atol=1e-5, rtol=0)
    assert len(pm.weights()) == kernels, [r["name"] for r in pm.weights()]


def _input(pm):
    return next(iter(pm.signatures["serving_default"].structured_input_signature[1]))


def _output(pm):
    return next(iter(pm.signatures["serving_default"].structured_outputs))


def test_train_to_target_finalize_and_tflite(architecture, tmp_path):
    name, path, reference, x, kernels = architecture
    pm = graphprune.prune(path, schedule=graphprune.PolynomialDecay(0.0, 0.75, 0, 6, frequency=2),
                          **PRUNE_OPTIONS.get(name, {}))
    signature = pm.signatures["serving_default"]
    variables = pm.trainable_variables
    optimizer = tf.keras.optimizers.SGD(0.01)
    target = np.random.RandomState(2).standard_normal(signature.structured_outputs[_output(pm)].shape.as_list()[1:])
    for _ in range(8):
        pm.update_masks()
        with tf.GradientTape() as tape:
            out = signature(**{_input(pm): x})[_output(pm)]
            loss = tf.reduce_mean((out - target.astype(np.float32)) ** 2)
        grads = tape.gradient(loss, variables)
        assert all(g is not None for g, v in zip(grads, variables) if "kernel" in v.name or "embedding" in v.name)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
    for row in pm.weights():
        assert abs(row["sparsity"] - 0.75) <= 1.0 / row["elements"] + 1e-9, row
    expected = np.asarray(signature(**{_input(pm): x})[_output(pm)])
    final = graphprune.finalize(pm, str(tmp_path / "final"), verify=True)
    loaded = tf.saved_model.load(final)
    np.testing.assert_allclose(loaded.signatures["serving_default"](**{_input(pm): x})[_output(pm)].numpy(),
                               expected, atol=1e-5, rtol=0)
    graph_def = loaded.signatures["serving_default"].graph.as_graph_def()
    names = [n.name for f in graph_def.library.function for n in f.node_def]
    ops = [n.op for f in graph_def.library.function for n in f.node_def]
    assert not any("/graphprune/mask/" in n for n in names)
    # Pruned weights are constants; other variables (biases) stay variables (issue #16).
    left = {v.name.split(":")[0] for v in loaded.original_variables}
    assert not left & {row["name"] for row in pm.weights()}, left
    assert ("ReadVariableOp" in ops) == bool(left)
    batch_size = None
    if name in KERAS_RECURRENT:
        # TF 2.21's converter refuses Keras 3 LSTM/GRU exports with an unknown batch (dynamic
        # TensorList element shapes), unpruned ones too: one clean error that says what to do,
        # and batch_size=1 (the static_batch pass) converts.
        with pytest.raises(graphprune.GraphPruneError, match="TFLite conversion failed.*TensorList.*batch_size=1"):
            graphprune.export_tflite(final, str(tmp_path / "m.tflite"))
        batch_size = 1
    tflite = graphprune.export_tflite(final, str(tmp_path / "m.tflite"), batch_size=batch_size)
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=tflite).get_signature_runner("serving_default")
    lite = np.concatenate([next(iter(runner(**{_input(pm): row[np.newaxis]}).values())) for row in x])
    np.testing.assert_allclose(lite, expected, atol=1e-4, rtol=1e-4)


def test_depthwise_can_be_excluded_by_rule(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(keras.layers.DepthwiseConv2D(3)(inputs)))
    model.export(str(tmp_path / "m"), verbose=False)
    pruned = graphprune.prune(str(tmp_path / "m"), schedule=graphprune.ConstantSparsity(0.5, 0))
    assert {r["op"] for r in pruned.weights()} == {"DepthwiseConv2dNative", "Conv2D"}
    excluded = graphprune.prune(str(tmp_path / "m"), schedule=graphprune.ConstantSparsity(0.5, 0),
                                rules=[graphprune.Rule("DepthwiseConv2dNative", skip=True)])
    assert {r["op"] for r in excluded.weights()} == {"Conv2D"}


ZOO = {
    "MobileNetV2": lambda keras: keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3)),
    "ResNet50": lambda keras: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)),
    "EfficientNetB0": lambda keras: keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_zoo(name, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = ZOO[name](keras)
    model.export(str(tmp_path / "model"), verbose=False)
    kernels = [w for w in model.weights if w.path.endswith("kernel")]
    pm = graphprune.prune(str(tmp_path / "model"), schedule=graphprune.ConstantSparsity(0.5, 0))
    assert len(pm.weights()) == len(kernels)
    x = np.random.RandomState(0).uniform(size=[1, *model.input_shape[1:]]).astype(np.float32)
    expected = model(x).numpy()
    final = graphprune.finalize(pm, str(tmp_path / "final"))  # masks all ones: outputs unchanged
    loaded = tf.saved_model.load(final)  # held: the biases are variables of the loaded object
    np.testing.assert_allclose(loaded.serve(x).numpy(), expected, atol=1e-4, rtol=1e-3)
    pm.prune_now(0.5)
    graphprune.export_tflite(graphprune.finalize(pm, str(tmp_path / "pruned")), str(tmp_path / "m.tflite"))
    report = graphprune.size_report(str(tmp_path / "m.tflite"))
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


def test_weights_inside_if_branches(tmp_path):
    then_weight = tf.Variable(np.random.RandomState(0).randn(4, 3).astype(np.float32), name="then_w")
    else_weight = tf.Variable(np.random.RandomState(1).randn(4, 3).astype(np.float32), name="else_w")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([], tf.bool)])
    def branchy(x, flag):
        return tf.cond(flag, lambda: tf.matmul(x, then_weight), lambda: tf.matmul(x, else_weight))

    x = tf.constant(np.random.RandomState(2).randn(2, 4).astype(np.float32))
    pm = graphprune.prune(branchy, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), verify=True)
    assert sorted(r["name"] for r in pm.weights()) == ["else_w", "then_w"]
    pm.update_masks()
    masks = {m.name.split("/graphprune")[0]: m.numpy().astype(np.float32) for m in pm.masks}
    np.testing.assert_array_equal(pm(x, True).numpy(), tf.matmul(x, then_weight * masks["then_w"]).numpy())
    np.testing.assert_array_equal(pm(x, False).numpy(), tf.matmul(x, else_weight * masks["else_w"]).numpy())
    loaded = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final"), verify=True))
    for flag in (True, False):
        np.testing.assert_array_equal(loaded(x, tf.constant(flag)).numpy(), pm(x, flag).numpy())
    graph_def = loaded.signatures["serving_default"].graph.as_graph_def()
    assert "ReadVariableOp" not in {n.op for f in graph_def.library.function for n in f.node_def}


# static_batch (the pass export_tflite(batch_size=...) runs) -----------------------------------


def _run_entry(model, values, name, x):
    from graphprune import rebuild
    from graphprune.pipeline import PassContext

    context = PassContext(values=values)
    live = {key: tf.Variable(context.value(model, key)) for key in model.variables}
    entry = next(e for e in model.entries if e.name == name and e.kind == "signature")
    return np.asarray(tf.function(lambda v: rebuild.import_entry(entry, [v], live)[0])(tf.constant(x)))


def test_static_batch_pass_numeric_structure_no_match_idempotent(tmp_path):
    from graphprune import graph as g
    from graphprune.load import load
    from graphprune.passes.static_batch import static_batch
    from graphprune.pipeline import PassContext, VariableValues

    build, shape, _ = ARCHITECTURES["lstm"]
    path = str(tmp_path / "lstm")
    _keras(build, shape).export(path, verbose=False)
    loaded = load(path)
    values = VariableValues(loaded.variables)
    result = static_batch(loaded.model, PassContext(values=values), batch_size=1)
    assert result.changed and result.report["inputs"] >= 1 and result.report["element_shapes"] >= 3
    for entry in result.model.entries:
        index = g.NodeIndex(entry.graph_def)
        for info in entry.inputs:
            assert info.shape[0] == 1
            assert index.nodes[info.placeholder].attr["shape"].shape.dim[0].size == 1
        for node in entry.graph_def.node:
            if node.op == "Const" and node.name.endswith("element_shape"):
                value = tf.make_ndarray(node.attr["value"].tensor)
                assert value.ndim == 0 or value[0] == 1, node.name  # a scalar -1 is "any shape"
    x = np.random.RandomState(0).standard_normal([1, *shape]).astype(np.float32)
    np.testing.assert_allclose(_run_entry(result.model, values, "serving_default", x),
                               _run_entry(loaded.model, values, "serving_default", x), atol=1e-6, rtol=0)
    assert not static_batch(result.model, PassContext(values=values), batch_size=1).changed  # idempotent

    static = tf.Module()
    static.w = tf.Variable(np.ones([3, 2], np.float32))
    static.f = tf.function(lambda v: tf.matmul(v, static.w), input_signature=[tf.TensorSpec([4, 3], tf.float32)])
    plain = load(static.f)
    assert not static_batch(plain.model, PassContext(values=VariableValues(plain.variables))).changed  # no match
    with pytest.raises(graphprune.GraphPruneError, match="batch_size"):
        static_batch(plain.model, PassContext(values=VariableValues(plain.variables)), batch_size=0)


class NestedLoops(tf.Module):
    """A loop body that calls a tf.function and runs a loop of its own: both are searched."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.cell_kernel = tf.Variable(rng.standard_normal([4, 4]).astype(np.float32) * 0.5, name="cell/kernel")
        self.nested_kernel = tf.Variable(rng.standard_normal([4, 4]).astype(np.float32) * 0.5, name="nested/kernel")

    @tf.function
    def cell(self, h):
        return tf.tanh(tf.matmul(h, self.cell_kernel))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        def body(t, h):
            def inner(u, state):
                return u + 1, tf.tanh(tf.matmul(state, self.nested_kernel))

            _, h = tf.while_loop(lambda u, state: u < 2, inner, (0, h))
            return t + 1, self.cell(h)

        return tf.while_loop(lambda t, h: t < 3, body, (0, x))[1]


def test_function_called_in_a_loop_body_and_a_nested_loop_are_pruned(tmp_path):
    model = NestedLoops()
    x = tf.constant(np.random.RandomState(1).standard_normal([2, 4]).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, so nothing is warned about
        pm = graphprune.prune(model, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    assert sorted(row["name"] for row in pm.weights()) == ["cell/kernel", "nested/kernel"]
    dense = model(x).numpy()
    np.testing.assert_allclose(pm(x).numpy(), dense, atol=1e-6, rtol=0)
    pm.update_masks()
    assert [row["sparsity"] for row in pm.weights()] == [pytest.approx(0.5)] * 2
    expected = pm(x).numpy()
    assert np.abs(expected - dense).max() > 1e-4  # the kernels really are pruned
    final = graphprune.finalize(pm, str(tmp_path / "final"))
    np.testing.assert_allclose(tf.saved_model.load(final)(x).numpy(), expected, atol=1e-5, rtol=0)
