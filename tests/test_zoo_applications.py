"""keras.applications models nobody here wrote (issue #16), random weights, small inputs: every
kernel found, all-ones equivalence, one-shot 50%, a GradientTape step, finalize equal."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphprune  # noqa: E402
import testmodels  # noqa: E402


CALIBRATION_SAMPLES = {"EfficientNetV2B0": 32}  # see _calibrated


def _calibrated(name: str, size: int, samples: int | None = None):
    """The model with batch-norm statistics taken from ``samples`` random inputs (the first 4 are
    returned to run it on): with the initial ones, activations collapse (about 1e-10 for
    MobileNetV3) and every comparison passes trivially. Few samples leave channels whose
    statistics are taken over a handful of values at the deepest, 1x1 layers: a near-zero
    variance there multiplies rounding by up to 1/sqrt(epsilon) per layer (EfficientNetV2B0 at
    32x32 from 4 samples reaches outputs of 4e5, and Keras itself, eager against its own
    SavedModel, differs by 5e-4 of that; from 32 samples: 1.9 and 1.3e-5)."""
    import keras

    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    samples = samples or CALIBRATION_SAMPLES.get(name, 4)
    x = np.random.RandomState(0).rand(samples, size, size, 3).astype(np.float32) * 255
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)
    return model, x[:4]


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [
    ("Xception", 71), ("EfficientNetV2B0", 32),
    ("DenseNet121", 32), ("MobileNetV3Small", 32), ("InceptionV3", 75), ("NASNetMobile", 32),
    ("ConvNeXtTiny", 32),  # grouped Conv2D, which Keras runs in an XLA function on CPU
    ("VGG16", 32), ("MobileNet", 32), ("ResNet50V2", 32)])
def test_keras_application_full_chain(tmp_path, name, size):
    model, x = _calibrated(name, size)
    model.export(str(tmp_path / "export"), verbose=False)
    original = tf.saved_model.load(str(tmp_path / "export"))
    reference = original.serve(x).numpy()
    scale = float(np.max(np.abs(reference)))
    assert scale > 1e-2, scale  # outputs that mean something

    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    counted = [w.path for w in model.weights if w.path.endswith("kernel") and len(w.shape) >= 2]
    assert len(pm.weights()) == len(counted)
    # All-ones masks: the same arithmetic, except where graphprune inlined an XLA-compiled
    # function (ConvNeXt's grouped convolutions), which TensorFlow's own kernels then run, and
    # EfficientNetV2B0, whose rebuilt graph differs from its SavedModel by 1.2e-5 of the scale with
    # no mask at all (`graphprune run --passes=find_weights`; oneDNN on or off): TensorFlow's
    # optimizer sums its swish blocks in another order once their function calls are inlined.
    tolerance = {"ConvNeXtTiny": 1e-5, "EfficientNetV2B0": 1e-4}.get(name, 0.0) * scale
    np.testing.assert_allclose(pm.serve(x).numpy(), reference, atol=tolerance, rtol=0)

    pm.prune_now()
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.02) for row in pm.weights())
    masked = pm.serve(x).numpy()
    one_shot = [mask.numpy() for mask in pm.masks]
    pm.update_masks()  # step 1 prunes at the same sparsity: one-shot already reached it, ties included
    assert all(np.array_equal(before, after.numpy()) for before, after in zip(one_shot, pm.masks))
    np.testing.assert_array_equal(pm.serve(x).numpy(), masked)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(pm.serve(x[:1])))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert all(g is not None for g in gradients)

    graphprune.save(pm, str(tmp_path / "prunable"))
    reloaded = tf.saved_model.load(str(tmp_path / "prunable"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(), masked, atol=1e-5 * max(1.0, float(np.abs(masked).max())),
                               rtol=0)
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final.serve(x).numpy(), masked, atol=1e-5 * max(1.0, float(np.abs(masked).max())),
                               rtol=0)
    # The converter folds batch norms into the convolutions and LiteRT's kernels sum in another
    # order: with random weights these deep networks differ from TensorFlow by up to 3e-3 of the
    # output scale (ResNet50V2; benchmarks/zoo.md), while a pruning mistake moves them by 1e-1.
    testmodels.check_tflite(str(tmp_path / "final"), str(tmp_path / "m.tflite"), x, masked, scale, tolerance=1e-2)
