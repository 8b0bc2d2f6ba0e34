"""known_channels: a convolution's input channel count, as its kernel states it, given to TFLite's
converter where its shape inference loses it (Keras 3's UpSampling2D on inputs of unknown height
and width: U-Nets, VAE decoders; the converter refused them, dense or pruned).

The pass's rewrite is run, saved, reloaded by TensorFlow alone and compared bit for bit; the
Keras models go through prune, finalize and export_tflite and run under LiteRT."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels

RNG = np.random.RandomState(0)


def _upsample(x):  # what Keras 3's UpSampling2D(2) traces to: channels lost to the converter
    return tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)


class Convolutions(tf.Module):
    """Every kind of convolution after an upsampling of unknown size, and two left as they are."""

    def __init__(self):
        def kernel(*shape):
            return tf.Variable(RNG.randn(*shape).astype(np.float32) * 0.3)

        self.conv = kernel(3, 3, 4, 6)
        self.depthwise = kernel(3, 3, 4, 2)
        self.conv3d = kernel(1, 3, 3, 4, 5)
        self.transposed = kernel(3, 3, 3, 4)  # [h, w, out, in]
        self.grouped = kernel(3, 3, 2, 6)  # reads 2 channels a group, of 4

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32),
                                  tf.TensorSpec([None, 2, None, None, 4], tf.float32)])
    def __call__(self, x, video):
        up = _upsample(x)
        size = tf.shape(up)

        @tf.function
        def inner(t):  # a body at depth 2
            return tf.nn.depthwise_conv2d(t, self.depthwise, [1, 1, 1, 1], "SAME")

        return {
            "conv": tf.nn.conv2d(up, self.conv, 1, "SAME"),
            "depthwise": inner(_upsample(x)),
            "conv3d": tf.nn.conv3d(tf.repeat(video, 2, axis=2), self.conv3d, [1] * 5, "SAME"),
            "transposed": tf.nn.conv2d_transpose(up, self.transposed, [size[0], size[1], size[2], 3], 1, "SAME"),
            "grouped": tf.nn.conv2d(up, self.grouped, 1, "SAME"),  # 4 channels recorded, 2 read: left
            "plain": tf.nn.conv2d(x, self.conv, 1, "SAME"),  # channels known to all: left
        }


def test_each_convolution_after_a_lost_channel_count_gets_it_stated_outputs_equal(tmp_path):
    module = Convolutions()
    step, _, rewritten = testmodels.one_pass(tmp_path, module, "known_channels")
    # per entry (the signature, the method): the conv, the depthwise at depth 2, the 3-D conv and the
    # transposed conv; the grouped and the plain conv left as they are
    assert len(step.report["stated"]) == 2 * 4, step.report
    ops = sorted({name.rsplit("/", 1)[-1].split("_")[0] for name in step.report["stated"]})
    assert ops == ["Conv2D", "Conv3D", "conv2d", "depthwise"], ops
    for height, width in ((3, 5), (4, 4)):
        x = tf.constant(RNG.randn(2, height, width, 4).astype(np.float32))
        video = tf.constant(RNG.randn(1, 2, height, width, 4).astype(np.float32))
        want, got = module(x, video), rewritten(x, video)
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def _keras_unet(path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    down = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    up = keras.layers.UpSampling2D(2)(down)
    up = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(up)
    up = keras.layers.DepthwiseConv2D(3, padding="same")(keras.layers.UpSampling2D(2)(up))
    outputs = keras.layers.Conv2D(2, 1)(up)
    keras.Model(inputs, outputs).export(path, verbose=False)


@pytest.mark.slow
def test_a_fully_convolutional_keras_model_the_converter_refused_runs_in_litert(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    export = str(tmp_path / "export")
    _keras_unet(export)
    with pytest.raises(Exception, match="Conv2D"):  # TensorFlow's converter alone refuses it
        tf.lite.TFLiteConverter.from_saved_model(export).convert()
    pm = graphprune.prune(export, graphprune.ConstantSparsity(0.5, 0))
    pm.prune_now()
    x = RNG.uniform(size=[1, 12, 16, 3]).astype(np.float32)
    masked = pm.serve(x).numpy()
    final = graphprune.finalize(pm, str(tmp_path / "final"))
    runner = Interpreter(model_path=graphprune.export_tflite(final, str(tmp_path / "m.tflite")))
    runner = runner.get_signature_runner("serving_default")
    lite = next(iter(runner(**{next(iter(runner.get_input_details())): x}).values()))
    assert lite.shape == masked.shape == (1, 24, 32, 2)
    np.testing.assert_allclose(lite, masked, atol=1e-5 * np.abs(masked).max(), rtol=1e-5)


@pytest.mark.slow
def test_a_model_the_converter_takes_is_converted_as_it_is(tmp_path):
    """A squeeze-and-excite block reshapes to a computed shape before a convolution (Keras's
    Reshape keeps the batch dynamic), as EfficientNet's do: it converts without help, so no Reshape
    is added (the flatbuffer has the plain converter's ops)."""
    import keras
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    squeezed = keras.layers.Reshape((1, 1, 4))(keras.layers.GlobalAveragePooling2D()(inputs))
    excited = keras.layers.Conv2D(4, 1, activation="sigmoid")(squeezed)
    export = str(tmp_path / "export")
    keras.Model(inputs, keras.layers.Multiply()([inputs, excited])).export(export, verbose=False)
    with open(tmp_path / "plain.tflite", "wb") as handle:
        handle.write(tf.lite.TFLiteConverter.from_saved_model(export).convert())
    ours = graphprune.export_tflite(export, str(tmp_path / "ours.tflite"))

    def ops(path):
        interpreter = Interpreter(model_path=path)
        return sorted(op["op_name"] for op in interpreter._get_ops_details())

    assert ops(ours) == ops(str(tmp_path / "plain.tflite"))
