"""Small real models the tests build, rewrite and run (no downloads, seeded weights)."""

import hashlib
import os

import numpy as np
import tensorflow as tf


def directory_digest(path):
    """Relative path -> sha256 of every file under ``path`` (to prove inputs stay untouched)."""
    digest = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            with open(full, "rb") as handle:
                digest[os.path.relpath(full, path)] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def _init(rng, *shape, scale=None):
    scale = scale or 1.0 / np.sqrt(np.prod(shape[:-1]))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class MLP(tf.Module):
    """784-free tiny MLP: dense 8->16 relu, dense 16->4."""

    def __init__(self, seed=0):
        super().__init__(name="mlp")
        rng = np.random.RandomState(seed)
        self.w1 = tf.Variable(_init(rng, 8, 16), name="dense/kernel")
        self.b1 = tf.Variable(np.zeros(16, np.float32), name="dense/bias")
        self.w2 = tf.Variable(_init(rng, 16, 4), name="dense_1/kernel")
        self.b2 = tf.Variable(np.zeros(4, np.float32), name="dense_1/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        hidden = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
        return tf.matmul(hidden, self.w2) + self.b2


class CNN(tf.Module):
    """conv2d 3x3 (3->8) -> depthwise 3x3 -> dense (flattened -> 10), with a nested tf.function."""

    def __init__(self, seed=0):
        super().__init__(name="cnn")
        rng = np.random.RandomState(seed)
        self.conv = tf.Variable(_init(rng, 3, 3, 3, 8), name="conv2d/kernel")
        self.conv_bias = tf.Variable(np.zeros(8, np.float32), name="conv2d/bias")
        self.depthwise = tf.Variable(_init(rng, 3, 3, 8, 1), name="depthwise_conv2d/depthwise_kernel")
        self.dense = tf.Variable(_init(rng, 4 * 4 * 8, 10), name="dense/kernel")
        self.dense_bias = tf.Variable(np.zeros(10, np.float32), name="dense/bias")

    @tf.function
    def features(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.conv, strides=1, padding="SAME") + self.conv_bias)
        y = tf.nn.max_pool2d(y, 2, 2, "VALID")
        return tf.nn.relu(tf.nn.depthwise_conv2d(y, self.depthwise, [1, 1, 1, 1], "SAME"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def __call__(self, x):
        y = self.features(x)
        return tf.matmul(tf.reshape(y, [-1, 4 * 4 * 8]), self.dense) + self.dense_bias


class NoPrunable(tf.Module):
    def __init__(self):
        super().__init__()
        self.scale = tf.Variable(2.0)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, x):
        return x * self.scale


def keras_functional_export(path, seed=0):
    """A Keras 3 functional CNN exported with model.export (serve endpoint + serving_default)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(4)(x)
    model = keras.Model(inputs, outputs)
    model.export(path, verbose=False)
    return path


def batch(entry_shape, seed=1, n=5):
    rng = np.random.RandomState(seed)
    return tf.constant(rng.standard_normal([n, *entry_shape]).astype(np.float32))


def check_tflite(saved_model_dir: str, tflite_path: str, x, expected, scale: float, tolerance: float = 1e-4) -> str:
    """Convert a finalized model to TFLite and run it under LiteRT: outputs equal ``expected``
    (atol ``tolerance`` x ``scale``), or the converter refuses with one line. Returns 'ok' or the
    refusal."""
    import graphprune
    from ai_edge_litert.interpreter import Interpreter

    try:
        graphprune.export_tflite(saved_model_dir, tflite_path)
    except graphprune.GraphPruneError as error:
        assert "\n" not in str(error).strip() and "Traceback" not in str(error)
        return str(error)
    runner = Interpreter(model_path=tflite_path).get_signature_runner("serving_default")
    if isinstance(x, dict):  # several named inputs and outputs (keras-hub text backbones)
        outputs = runner(**{name: np.asarray(value) for name, value in x.items()})
        assert sorted(outputs) == sorted(expected), (sorted(outputs), sorted(expected))
        for name, want in expected.items():
            np.testing.assert_allclose(outputs[name], np.asarray(want), atol=tolerance * max(1.0, scale), rtol=1e-4)
        return "ok"
    name = next(iter(runner.get_input_details()))
    outputs = runner(**{name: np.asarray(x)})
    lite = next(iter(outputs.values()))
    np.testing.assert_allclose(lite, expected, atol=tolerance * max(1.0, scale), rtol=1e-4)
    return "ok"


class StreamNet(tf.Module):
    """A small pre-norm transformer's residual stream, written by hand: token embedding looked up
    on the variable (ResourceGather), a position table sliced and broadcast, two blocks (a layer
    norm as Keras computes it, then an MLP; an RMS norm, then a single-head attention), a final
    layer norm, mean over tokens, and logits from the token table, transposed (tied, as GPT-2's).
    Every normalization averages over the stream's channels."""

    def __init__(self, seed=0, vocabulary=20, length=6, width=16, hidden=32):
        super().__init__(name="stream_net")
        rng = np.random.RandomState(seed)
        self.length, self.width = length, width
        self.tokens = tf.Variable(rng.standard_normal([vocabulary, width]).astype(np.float32), name="tokens")
        self.positions = tf.Variable(rng.standard_normal([length, width]).astype(np.float32) * 0.1, name="positions")
        self.norms = [(tf.Variable(1 + rng.standard_normal(width).astype(np.float32) * 0.1, name=f"norm{i}/gamma"),
                       tf.Variable(rng.standard_normal(width).astype(np.float32) * 0.1, name=f"norm{i}/beta"))
                      for i in range(2)]
        self.up = tf.Variable(_init(rng, width, hidden), name="mlp/up/kernel")
        self.up_bias = tf.Variable(rng.standard_normal(hidden).astype(np.float32) * 0.1, name="mlp/up/bias")
        self.down = tf.Variable(_init(rng, hidden, width), name="mlp/down/kernel")
        self.down_bias = tf.Variable(rng.standard_normal(width).astype(np.float32) * 0.1, name="mlp/down/bias")
        self.rms = tf.Variable(1 + rng.standard_normal(width).astype(np.float32) * 0.1, name="rms/scale")
        self.qkv = [tf.Variable(_init(rng, width, 8), name=f"attention/{n}/kernel") for n in "qkv"]
        self.out = tf.Variable(_init(rng, 8, width), name="attention/out/kernel")

    def _layer_norm(self, x, i):
        mean = tf.reduce_mean(x, -1, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), -1, keepdims=True)
        gamma, beta = self.norms[i]
        return (x - mean) * tf.math.rsqrt(variance + 1e-3) * gamma + beta

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def __call__(self, ids):
        x = tf.gather(self.tokens, ids)
        steps = tf.shape(ids)[1]
        x += tf.broadcast_to(tf.slice(self.positions, [0, 0], [steps, self.width]),
                             tf.stack([tf.shape(ids)[0], steps, self.width]))
        x += tf.matmul(tf.nn.gelu(tf.matmul(self._layer_norm(x, 0), self.up) + self.up_bias), self.down) \
            + self.down_bias
        h = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True) + 1e-3) * self.rms
        q, k, v = (tf.einsum("btd,de->bte", h, w) for w in self.qkv)
        attention = tf.nn.softmax(tf.einsum("bte,bse->bts", q, k) / np.sqrt(8.0), axis=-1)
        x += tf.einsum("bte,ed->btd", tf.einsum("bts,bse->bte", attention, v), self.out)
        return tf.matmul(tf.reduce_mean(self._layer_norm(x, 1), 1), tf.transpose(self.tokens))


class ChannelNet(tf.Module):
    """Channel dependencies of every kind a CNN has: conv -> BiasAdd -> FusedBatchNorm -> relu,
    a residual Add (two producers of one stream), a depthwise conv, Pad and max pooling, a concat
    of two branches, a flatten into a dense layer, and a dense hidden layer."""

    def __init__(self, seed=0):
        super().__init__(name="channel_net")
        rng = np.random.RandomState(seed)
        self.stem = tf.Variable(_init(rng, 3, 3, 3, 16), name="stem/kernel")
        self.stem_bias = tf.Variable(rng.standard_normal(16).astype(np.float32) * 0.1, name="stem/bias")
        self.bn_scale = tf.Variable(1 + rng.standard_normal(16).astype(np.float32) * 0.1, name="bn/gamma")
        self.bn_offset = tf.Variable(rng.standard_normal(16).astype(np.float32) * 0.1, name="bn/beta")
        self.bn_mean = tf.Variable(rng.standard_normal(16).astype(np.float32) * 0.1, name="bn/moving_mean",
                                   trainable=False)
        self.bn_variance = tf.Variable(1 + rng.rand(16).astype(np.float32), name="bn/moving_variance",
                                       trainable=False)
        self.expand = tf.Variable(_init(rng, 1, 1, 16, 32), name="block/expand/kernel")
        self.depthwise = tf.Variable(_init(rng, 3, 3, 32, 1), name="block/depthwise/kernel")
        self.project = tf.Variable(_init(rng, 1, 1, 32, 16), name="block/project/kernel")
        self.project_bias = tf.Variable(rng.standard_normal(16).astype(np.float32) * 0.1, name="block/project/bias")
        self.left = tf.Variable(_init(rng, 3, 3, 16, 8), name="left/kernel")
        self.right = tf.Variable(_init(rng, 1, 1, 16, 12), name="right/kernel")
        self.mix = tf.Variable(_init(rng, 1, 1, 20, 24), name="mix/kernel")
        self.hidden = tf.Variable(_init(rng, 4 * 4 * 24, 32), name="hidden/kernel")
        self.hidden_bias = tf.Variable(rng.standard_normal(32).astype(np.float32) * 0.1, name="hidden/bias")
        self.head = tf.Variable(_init(rng, 32, 10), name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def __call__(self, x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, self.stem, 1, "SAME"), self.stem_bias)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(y, self.bn_scale, self.bn_offset, self.bn_mean,
                                                   self.bn_variance, is_training=False)
        y = tf.nn.relu(y)
        z = tf.nn.relu6(tf.nn.conv2d(y, self.expand, 1, "SAME"))
        z = tf.nn.relu6(tf.nn.depthwise_conv2d(z, self.depthwise, [1, 1, 1, 1], "SAME"))
        y = y + tf.nn.conv2d(z, self.project, 1, "SAME") + self.project_bias  # residual: one stream
        y = tf.nn.max_pool2d(tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, 0]]), 2, 2, "VALID")
        both = tf.concat([tf.nn.relu(tf.nn.conv2d(y, self.left, 1, "SAME")),
                          tf.nn.relu(tf.nn.conv2d(y, self.right, 1, "SAME"))], axis=-1)
        mixed = tf.nn.relu(tf.nn.conv2d(both, self.mix, 1, "SAME"))
        hidden = tf.nn.relu(tf.matmul(tf.reshape(mixed, [-1, 4 * 4 * 24]), self.hidden) + self.hidden_bias)
        return tf.matmul(hidden, self.head)


def train_mirrored(strategy, pm, optimizer, data, batch_size: int, steps: int) -> None:
    """``steps`` of the user's own loop under ``strategy``: update_masks(), then a replicated
    step of SGD on the mean squared error, on batches of ``data`` ((x, y) tensors)."""
    batches = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(data).batch(batch_size).repeat()))

    @tf.function
    def train_step(batch):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((pm(x) - y) ** 2)
            grads = tape.gradient(loss, pm.trainable_variables)
            optimizer.apply_gradients(zip(grads, pm.trainable_variables))

        strategy.run(step, args=batch)

    for _ in range(steps):
        pm.update_masks()
        train_step(next(batches))


class BoxesOffTheImage(tf.Module):
    """keras-hub SAM 3's geometry encoder, in small: features gathered at indices computed from
    box coordinates of unknown count. The normal random values finalize's check makes put the
    boxes off the image, so the gather refuses them at every size. ``cells``: the table rows a
    box's coordinate in [0, 1) spans (another model on the same variables, with another value)."""

    def __init__(self, cells: float = 8.0):
        self.cells = cells
        rng = np.random.RandomState(7)
        self.kernel = tf.Variable(rng.standard_normal([4, 8]).astype(np.float32))
        self.table = tf.Variable(rng.standard_normal([8, 4]).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, None], tf.float32)])
    def __call__(self, x, boxes):
        rows = tf.gather(self.table, tf.cast(tf.floor(boxes * self.cells), tf.int32))  # [batch, boxes, 4]
        return tf.matmul(x, self.kernel) + tf.reduce_sum(tf.matmul(rows, self.kernel), 1)


def one_pass(tmp_path, module, name: str):
    """Save tf.Module ``module``, run the pass ``name`` alone on it and save what it makes: (the
    pass's PassResult, the rewritten TracedModel, that model reloaded by TensorFlow alone)."""
    from graphprune.api import save_traced
    from graphprune.load import load
    from graphprune.pipeline import PassContext, VariableValues, run_pipeline

    tf.saved_model.save(module, str(tmp_path / "original"))
    loaded = load(str(tmp_path / "original"))
    values = VariableValues(loaded.variables)
    result = run_pipeline(loaded.model, [(name, {})], PassContext(values=values))
    (_, step, _), = result.reports
    save_traced(result.model, values, str(tmp_path / "rewritten"))
    return step, result.model, tf.saved_model.load(str(tmp_path / "rewritten"))


def refused_then_converted(tmp_path, module, refused: str):
    """Save tf.Module ``module``; TensorFlow's TFLite converter alone must refuse it (an error that
    names ``refused``); graphprune.export_tflite converts it, leaving the SavedModel as it was.
    Returns the LiteRT signature runner of what it wrote."""
    import pytest
    from ai_edge_litert.interpreter import Interpreter

    import graphprune

    path = str(tmp_path / "model")
    tf.saved_model.save(module, path)
    with pytest.raises(Exception, match=refused):
        tf.lite.TFLiteConverter.from_saved_model(path).convert()
    before = directory_digest(path)
    tflite = graphprune.export_tflite(path, str(tmp_path / "m.tflite"))
    assert directory_digest(path) == before  # rewritten on a copy
    return Interpreter(model_path=tflite).get_signature_runner()
