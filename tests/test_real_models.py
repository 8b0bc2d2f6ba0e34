"""Models nobody here wrote (issue #16): keras-hub backbones with dict inputs, weights behind
views, Keras 3 custom gradients, the reference's schedule arithmetic, finalize's own check."""

import dataclasses
import warnings
import os
import re

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphprune  # noqa: E402
import testmodels  # noqa: E402


def _hub_backbones():
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, hidden_dim=16, intermediate_dim=32)
    return {
        "bert": lambda: models.BertBackbone(num_heads=2, max_sequence_length=8, **small),
        "gpt2": lambda: models.GPT2Backbone(num_heads=2, max_sequence_length=8, **small),
        "gemma": lambda: models.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=8, **small),
        "llama": lambda: models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **small),
        "t5": lambda: models.T5Backbone(num_heads=2, **small),
        "whisper": lambda: models.WhisperBackbone(num_heads=2, num_mels=8, max_encoder_sequence_length=16,
                                                  max_decoder_sequence_length=8, **small),
        "distilbert": lambda: models.DistilBertBackbone(num_heads=2, max_sequence_length=8, **small),
        "roberta": lambda: models.RobertaBackbone(num_heads=2, max_sequence_length=8, **small),
        "mistral": lambda: models.MistralBackbone(num_query_heads=2, num_key_value_heads=1, **small),
        "qwen": lambda: models.QwenBackbone(num_query_heads=2, num_key_value_heads=1, **small),
        "opt": lambda: models.OPTBackbone(num_heads=2, max_sequence_length=8, **small),
        "gpt_neox": lambda: models.GPTNeoXBackbone(num_heads=2, max_sequence_length=8, **small),
    }


def _hub_vision_backbones():
    import keras_hub

    models = keras_hub.models
    image = (32, 32, 3)
    return {
        "vit": lambda: models.ViTBackbone(image_shape=image, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                          mlp_dim=32),
        "resnet": lambda: models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                                                stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1],
                                                stackwise_num_strides=[1, 2], block_type="basic_block",
                                                image_shape=image),
        "vgg": lambda: models.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16],
                                          image_shape=image),
        "densenet": lambda: models.DenseNetBackbone(stackwise_num_repeats=[2, 2], image_shape=image, growth_rate=8),
        # fused (EfficientNetV2-style) blocks: nested layers whose variables share one TF name
        "efficientnet": lambda: models.EfficientNetBackbone(
            stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
            stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1], stackwise_input_filters=[8, 8],
            stackwise_output_filters=[8, 16], stackwise_expansion_ratios=[1, 4],
            stackwise_squeeze_and_excite_ratios=[0.0, 0.25], stackwise_strides=[1, 2],
            stackwise_block_types=["fused", "fused"], stackwise_force_input_filters=[0, 0],
            stackwise_nores_option=[False, False], input_shape=image, num_features=32),
    }


def _inputs(spec: dict, rng) -> dict:
    values = {}
    for name, tensor_spec in spec.items():
        if tensor_spec.dtype.is_floating:  # Whisper's audio features: (batch, frames, mels)
            values[name] = tf.constant(rng.standard_normal([2, 16, 8]).astype(np.float32))
        elif "padding_mask" in name:
            values[name] = tf.ones([2, 8], tensor_spec.dtype)
        elif "segment" in name:
            values[name] = tf.zeros([2, 8], tensor_spec.dtype)
        else:
            values[name] = tf.constant(rng.randint(0, 50, [2, 8]), tensor_spec.dtype)
    return values


def _max_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "gemma", "llama", "t5", "whisper", "distilbert", "roberta",
                                  "mistral", "qwen", "opt", "gpt_neox"])
def test_keras_hub_text_backbone_with_dict_inputs_full_chain(tmp_path, name):
    model = _hub_backbones()[name]()
    model.export(str(tmp_path / "export"), verbose=False)
    original = tf.saved_model.load(str(tmp_path / "export"))
    signature = original.signatures["serving_default"]
    inputs = _inputs(signature.structured_input_signature[1], np.random.RandomState(0))
    reference = signature(**inputs)
    scale = max(float(np.max(np.abs(v.numpy()))) for v in reference.values())
    assert scale > 0.1  # random weights, but outputs that mean something

    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0))
    counted = sorted(w.path for w in model.weights if w.path.endswith("kernel") and len(w.shape) >= 2)
    found = sorted(row["name"] for row in pm.weights())
    assert len(found) == len(counted), (found, counted)
    assert _max_difference(reference, pm.signatures["serving_default"](**inputs)) == 0.0  # all-ones masks

    pm.prune_now()
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in pm.weights())
    masked = pm.signatures["serving_default"](**inputs)
    with tf.GradientTape() as tape:
        loss = sum(tf.reduce_sum(tf.square(v)) for v in tf.nest.flatten(pm.serve(inputs)))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert len(gradients) == len(pm.trainable_variables) and all(g is not None for g in gradients)

    graphprune.save(pm, str(tmp_path / "prunable"))
    reloaded = tf.saved_model.load(str(tmp_path / "prunable"))
    assert _max_difference(masked, reloaded.signatures["serving_default"](**inputs)) <= 1e-5 * scale
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    assert _max_difference(masked, final.signatures["serving_default"](**inputs)) <= 1e-5 * scale
    outcome = testmodels.check_tflite(str(tmp_path / "final"), str(tmp_path / "m.tflite"),
                                      {k: v.numpy() for k, v in inputs.items()},
                                      {k: v.numpy() for k, v in masked.items()}, scale)
    # Gemma, Llama, Mistral, Qwen and T5 too: their attention masks' new axes (x[:, None, :, :] on
    # dynamic shapes), which TensorFlow's converter refuses, go to it as ExpandDims (expand_new_axes)
    assert outcome == "ok", outcome


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "resnet", "vgg", "densenet", "efficientnet"])
def test_keras_hub_vision_backbone_full_chain(tmp_path, name):
    import keras

    model = _hub_vision_backbones()[name]()
    x = np.random.RandomState(0).uniform(size=[3, 32, 32, 3]).astype(np.float32)
    for layer in model._flatten_layers():  # batch-norm statistics from random inputs, or outputs collapse
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)
    model.export(str(tmp_path / "export"), verbose=False)
    original = tf.saved_model.load(str(tmp_path / "export"))
    reference = original.serve(x).numpy()
    scale = float(np.abs(reference).max())
    assert scale > 0.1, scale

    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0))
    counted = sorted(w.path for w in model.weights if w.path.endswith("kernel") and len(w.shape) >= 2)
    found = sorted(row["name"] for row in pm.weights())
    assert found == counted  # named by the variable paths Keras shows, each once
    np.testing.assert_allclose(pm.serve(x).numpy(), reference, atol=1e-6 * scale, rtol=0)  # all-ones masks

    pm.prune_now()
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.02) for row in pm.weights())
    masked = pm.serve(x).numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(pm.serve(x[:1])))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert all(g is not None for g in gradients)
    graphprune.save(pm, str(tmp_path / "prunable"))
    reloaded = tf.saved_model.load(str(tmp_path / "prunable"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(), masked, atol=1e-5 * scale, rtol=0)
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final.serve(x).numpy(), masked, atol=1e-5 * scale, rtol=0)
    report = graphprune.size_report(str(tmp_path / "final"))
    assert len(report.weights) == len(counted)  # every pruned weight is reported after freezing
    testmodels.check_tflite(str(tmp_path / "final"), str(tmp_path / "m.tflite"), x, masked, scale)


def test_weights_behind_views_are_found_conv1d_expanddims_and_transpose(tmp_path):
    import keras

    inputs = keras.Input((12, 4))
    hidden = keras.layers.Conv1D(8, 3, name="conv1d")(inputs)
    hidden = keras.layers.SeparableConv1D(6, 3, name="separable")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(hidden)))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    found = sorted(row["name"] for row in pm.weights())
    assert found == ["conv1d/kernel", "head/kernel", "separable/depthwise_kernel", "separable/pointwise_kernel"]
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.02) for row in pm.weights())

    rng = np.random.RandomState(0)
    stem = tf.Variable(rng.randn(3, 4, 8).astype(np.float32), name="stem")
    projection = tf.Variable(rng.randn(10, 8).astype(np.float32), name="projection")

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 4], tf.float32)])
    def alone(x):  # a lone tf.nn.conv1d model is not refused as having nothing to prune
        features = tf.reduce_mean(tf.nn.conv1d(x, stem, 1, "VALID"), axis=1)
        return tf.matmul(features, tf.transpose(projection))

    pm = graphprune.prune(alone, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    assert sorted(row["name"] for row in pm.weights()) == ["projection", "stem"]
    x = tf.constant(rng.randn(2, 12, 4).astype(np.float32))
    pm.update_masks()
    masks = {m.name.split("/graphprune")[0]: tf.cast(m, tf.float32) for m in pm.masks}
    expected = tf.matmul(tf.reduce_mean(tf.nn.conv1d(x, stem * masks["stem"], 1, "VALID"), axis=1),
                         tf.transpose(projection * masks["projection"]))
    np.testing.assert_allclose(pm(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final(x).numpy(), pm(x).numpy(), rtol=1e-5, atol=1e-6)
    assert sorted(w.name for w in graphprune.size_report(str(tmp_path / "final")).weights) == ["projection", "stem"]


def test_keras_swish_trains_after_pruning_with_the_true_gradient(tmp_path):
    import keras

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(16, activation="swish")(inputs)))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0))
    x = tf.constant(np.random.RandomState(0).randn(3, 8).astype(np.float32))
    with tf.GradientTape() as tape:
        expected_loss = tf.reduce_sum(model(x) ** 2)
    expected = tape.gradient(expected_loss, model.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pm.serve(x) ** 2)
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert len(gradients) == 4
    for want, got in zip(expected, gradients):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_polynomial_decay_rounds_like_the_reference():
    schedule = graphprune.PolynomialDecay(0.45, 0.61, 1, 171, 2, 4)
    _, sparsity = schedule(tf.constant(1, tf.int64))
    assert np.float32(sparsity) == np.float32(0.45000002)
    mask = graphprune.magnitude_mask(np.arange(1, 11, dtype=np.float32).reshape(2, 5), sparsity)
    assert int(np.sum(mask.numpy())) == 5


def test_finalize_refuses_a_model_that_computes_something_else(mlp):
    from graphprune.finalization import check_final, finalize_model, products_as_folded_weights

    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    final, values, result = finalize_model(pm)
    check_final(result.reports[0][1].model, final, values)  # the real one passes
    entries = []
    for entry in final.entries:
        graph_def = type(entry.graph_def)()
        graph_def.CopyFrom(entry.graph_def)
        for node in graph_def.node:
            array = tf.make_ndarray(node.attr["value"].tensor).copy() if node.op == "Const" else None
            if array is not None and array.ndim == 2 and np.count_nonzero(array):  # a frozen kernel
                array.flat[np.flatnonzero(array)[0]] += 0.5
                node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(array))
                break
        entries.append(dataclasses.replace(entry, graph_def=graph_def))
    tampered = dataclasses.replace(final, entries=tuple(entries))
    with pytest.raises(graphprune.PassError, match=r"differs from the masked model by .*output 0 of"):
        check_final(result.reports[0][1].model, tampered, values)
    # finalize's own check reads the products as the folded weights they equal: it refuses too
    with pytest.raises(graphprune.PassError, match=r"differs from the masked model by .*output 0 of") as refused:
        check_final(products_as_folded_weights(result.reports[0][1].model), tampered, values)
    # the message names the tolerance that would accept it, and that tolerance does
    tolerance = float(re.search(r"check_tolerance=([0-9.e+-]+)", str(refused.value)).group(1))
    check_final(products_as_folded_weights(result.reports[0][1].model), tampered, values, atol=tolerance,
                rtol=tolerance)
    for bad in (-1e-3, 1.0, "1e-4", True):
        with pytest.raises(graphprune.GraphPruneError, match="check_tolerance must be"):
            graphprune.finalize(pm, "unused", check_tolerance=bad)


class ThreeTraces(tf.Module):
    """__call__ traced for three input signatures, one of them with training=True."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(0).randn(8, 4).astype(np.float32), name="dense/kernel")

    @tf.function
    def __call__(self, x, training=False):
        y = tf.matmul(x, self.w)
        return y * 2.0 if training else y


@pytest.mark.parametrize("as_saved_model", [False, True])
def test_every_trace_of_a_polymorphic_function_is_kept(tmp_path, as_saved_model):
    module = ThreeTraces()
    calls = [((tf.ones([2, 8]),), {}), ((tf.ones([3, 8]),), {"training": True}), ((tf.ones([1, 8], tf.float32),), {})]
    for args, kwargs in calls:
        module(*args, **kwargs)
    target = module
    if as_saved_model:
        tf.saved_model.save(module, str(tmp_path / "m"))
        target = str(tmp_path / "m")
    pm = graphprune.prune(target, schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    masked = module.w * tf.cast(pm.masks[0], tf.float32)
    rng = np.random.RandomState(1)
    inputs = [tf.constant(rng.randn(*a[0].shape).astype(np.float32)) for a, _ in calls]
    for x, (_, kwargs) in zip(inputs, calls):
        expected = tf.matmul(x, masked) * (2.0 if kwargs.get("training") else 1.0)
        np.testing.assert_allclose(pm(x, **kwargs).numpy(), expected.numpy(), rtol=1e-6)
    graphprune.save(pm, str(tmp_path / "prunable"))
    final = graphprune.finalize(pm, str(tmp_path / "final"))
    for path in (str(tmp_path / "prunable"), final):
        loaded = tf.saved_model.load(path)
        for x, (_, kwargs) in zip(inputs, calls):
            np.testing.assert_allclose(loaded(x, **kwargs).numpy(), pm(x, **kwargs).numpy(), rtol=1e-6)


def test_size_report_states_its_gzip_level(tmp_path, mlp):
    import gzip

    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    report = graphprune.size_report(graphprune.finalize(pm, str(tmp_path / "final")))
    assert "gzip -6" in report.table() and report.to_dict()["totals"]["gzip_level"] == 6
    weight = report.weights[0]
    assert weight.gzip_bytes < weight.raw_bytes
    values = np.zeros(weight.elements, np.float32)  # the level is what the number is measured at
    assert graphprune.report.gzip_size(values.tobytes(), 6) == len(gzip.compress(values.tobytes(), 6, mtime=0))


class _Derived(tf.Module):
    """A weight computed from variables (weight normalization) next to a plain one."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.direction = tf.Variable(rng.randn(4, 3).astype(np.float32), name="direction")
        self.gain = tf.Variable(np.ones([3], np.float32), name="gain")
        self.plain = tf.Variable(rng.randn(3, 2).astype(np.float32), name="plain")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        kernel = self.gain * self.direction / tf.norm(self.direction, axis=0)
        return tf.matmul(tf.matmul(x, kernel), self.plain)


def test_a_weight_reached_through_ops_not_followed_is_listed_with_the_reason(tmp_path):
    with pytest.warns(UserWarning, match="not pruning 2 weights \\(pm.skipped\\(\\) lists them\\)") as caught:
        pm = graphprune.prune(_Derived(), schedule=graphprune.ConstantSparsity(0.5, 0))
    assert len([w for w in caught if "not pruning" in str(w.message)]) == 1  # once, with the count
    assert [row["name"] for row in pm.weights()] == ["plain"]
    skipped = pm.skipped()
    assert sorted(skipped) == ["direction", "gain"]
    assert all("reaches MatMul" in reason and "does not follow" in reason for reason in skipped.values())
    report = graphprune.size_report(graphprune.finalize(pm.prune_now() or pm, str(tmp_path / "final")))
    assert sorted(report.skipped) == ["direction", "gain"] and "not pruned: direction" in report.table()


def test_activations_are_never_reported_as_skipped_weights(mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0))
    assert pm.skipped() == {}


class Tokenized(tf.Module):
    """A text classifier as a SavedModel ships one: tensorflow_text's whitespace tokenizer (ops
    TensorFlow itself does not have), a vocabulary hash table, a ragged embedding lookup averaged
    over the words (a shape TensorFlow cannot infer), a dense hidden layer and a head."""

    def __init__(self):
        import tensorflow_text

        self.tokenizer = tensorflow_text.WhitespaceTokenizer()
        words = tf.lookup.KeyValueTensorInitializer(tf.constant(["a", "b", "c", "d"]), tf.constant([1, 2, 3, 4],
                                                                                                 tf.int64))
        self.table = tf.lookup.StaticHashTable(words, 0)
        rng = np.random.RandomState(0)
        self.embeddings = tf.Variable(rng.standard_normal([5, 16]).astype(np.float32), name="embeddings")
        self.hidden = tf.Variable(rng.standard_normal([16, 32]).astype(np.float32) * 0.3, name="hidden/kernel")
        self.head = tf.Variable(rng.standard_normal([32, 3]).astype(np.float32) * 0.3, name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, text):
        ids = self.table.lookup(self.tokenizer.tokenize(text))
        mean = tf.reduce_mean(tf.gather(self.embeddings, ids).to_tensor(), 1)
        return tf.nn.relu(mean @ self.hidden) @ self.head


def test_a_text_model_with_tensorflow_text_ops_from_the_cli(tmp_path):
    """The CLI runs in a fresh process that never imported tensorflow_text: graphprune imports it
    where the SavedModel needs its ops. The hidden layer's neurons are found behind the ragged
    mean, trained on an .npz of unicode strings, shrunk, and the result computes the masked model."""
    pytest.importorskip("tensorflow_text")
    from test_cli import graphprune as cli

    tf.saved_model.save(Tokenized(), str(tmp_path / "model"))
    words = np.array(["a b", "c d a", "b", "d d c a", "a zz", "c"] * 2)  # numpy unicode, as users save text
    np.savez(tmp_path / "data.npz", x=words, y=np.arange(len(words)) % 3)
    steps = [("prune", f"--input={tmp_path / 'model'}", f"--output={tmp_path / 'p'}", "--structure=channel",
              "--final_sparsity=0.5", "--one_shot"),
             ("train", f"--input={tmp_path / 'p'}", f"--output={tmp_path / 't'}", f"--data={tmp_path / 'data.npz'}",
              "--batch_size=4"),
             ("finalize", f"--input={tmp_path / 't'}", f"--output={tmp_path / 'f'}", "--shrink")]
    for args in steps:
        cli(*args)
    trained, shrunk = tf.saved_model.load(str(tmp_path / "t")), tf.saved_model.load(str(tmp_path / "f"))
    text = tf.constant(["a b c", "d", "b b a c zz", ""])
    expected = trained.signatures["serving_default"](text=text)["output_0"].numpy()
    np.testing.assert_allclose(shrunk.signatures["serving_default"](text=text)["output_0"].numpy(), expected,
                               atol=1e-5 * np.abs(expected).max(), rtol=0)
    assert graphprune.cost(str(tmp_path / "f")).parameters == 5 * 16 + 16 * 16 + 16 * 3  # 32 neurons -> 16
    # an op that no library installed here defines: one line, naming it, nothing written
    model = tmp_path / "unknown_op"
    tf.saved_model.save(Tokenized(), str(model))
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model / "saved_model.pb").read_bytes())
    relus = [node for function in proto.meta_graphs[0].graph_def.library.function for node in function.node_def
             if node.op == "Relu"]
    assert relus
    for node in relus:
        node.op = "GraphpruneNoSuchOp"
    (model / "saved_model.pb").write_bytes(proto.SerializeToString())
    done = cli("prune", f"--input={model}", f"--output={tmp_path / 'refused'}", "--final_sparsity=0.5", "--one_shot",
               check=False)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-3000:]
    assert "uses op 'GraphpruneNoSuchOp', which this TensorFlow does not have (tensorflow_text loaded" in done.stderr
    assert not (tmp_path / "refused").exists()


def test_train_data_is_cast_to_the_models_integer_inputs():
    from graphprune.errors import DataError
    from graphprune.training import check_data

    spec = tf.TensorSpec([None, 4], tf.int32)
    x, y = check_data(np.arange(8, dtype=np.int64).reshape(2, 4), np.array([0, 1]), spec, "softmax_cross_entropy")
    assert x.dtype == np.int32 and x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DataError, match=r"'x' has values from 0 to 4294967296; the model takes int32"):
        check_data(np.array([[0, 1, 2, 2 ** 32]], np.int64), np.array([0]), spec, "softmax_cross_entropy")
    with pytest.raises(DataError, match=r"'x' has dtype float32; the model takes int32"):
        check_data(np.ones([1, 4], np.float32), np.array([0]), spec, "softmax_cross_entropy")
    text, _ = check_data(np.array(["é a", "b"]), np.array([0, 1]), tf.TensorSpec([None], tf.string),
                         "softmax_cross_entropy")
    assert text.tolist() == ["é a".encode(), b"b"]


def test_keras_hub_classifier_with_its_tokenizer_inside_shrinks(tmp_path):
    """keras-hub's BERT classifier behind its own preprocessor (tensorflow_text's WordPiece
    tokenizer, a vocabulary table, packing to 8 tokens), served on raw strings from a tf.Module as
    a text model is deployed: heads and MLP neurons go and the shrunk model computes the masked one."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jumps", "over",
                  "lazy", "dog"]
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary), sequence_length=8)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=len(vocabulary), num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32, max_sequence_length=8)
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None, dropout=0.0)

    class Serve(tf.Module):
        def __init__(self):
            self.preprocessor, self.classifier = preprocessor, classifier

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, text):
            return self.classifier(self.preprocessor(text), training=False)

    tf.saved_model.save(Serve(), str(tmp_path / "model"))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    prunable = sorted(group.size for group in graphprune.channel_groups(pm) if group.prunable)
    # the heads, the query/key and the value head dims, the pooler's and the MLP's neurons
    assert prunable == [2, 8, 8, 16, 32], prunable
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    text = tf.constant(["the quick brown fox jumps over the lazy dog", "dog", "", "words it has never seen"])
    expected = pm(text).numpy()
    shrunk = tf.saved_model.load(out).signatures["serving_default"](text=text)
    np.testing.assert_allclose(next(iter(shrunk.values())).numpy(), expected, atol=1e-5 * np.abs(expected).max(),
                               rtol=0)
    assert graphprune.cost(out).parameters < 0.55 * graphprune.cost(str(tmp_path / "model")).parameters
