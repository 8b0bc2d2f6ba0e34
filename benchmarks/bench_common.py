"""Shared by the side-by-side benchmarks: environment, data, the training loop, the reference model.

Import this before TensorFlow. When tf-keras is installed, it sets TF_USE_LEGACY_KERAS=1 so that
the reference toolkit (tensorflow-model-optimization) works in the same process; graphprune never
imports Keras, so it is unaffected, and every model here trains with the same `tf.keras` Adam.

Install the reference for benchmarks only (never a graphprune dependency):

    pip install -e ".[bench]"        # tf-keras, tensorflow-model-optimization, matplotlib
    apt-get install dataset-fashion-mnist   # the real data, /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HAVE_REFERENCE = all(importlib.util.find_spec(name) for name in ("tf_keras", "tensorflow_model_optimization"))
if HAVE_REFERENCE:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
INSTALL_HINT = ('the reference toolkit is not installed: pip install -e ".[bench]" '
                "(tf-keras + tensorflow-model-optimization, for benchmarks only)")


def quiet() -> None:
    """Keep TensorFlow's Python INFO lines (saver, signatures) out of the benchmark output."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def tfmot():
    if not HAVE_REFERENCE:
        raise SystemExit(INSTALL_HINT)
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def require_full_data(data_dir: str) -> dict:
    """Fashion-MNIST from the Debian package; the shipped 2,000-image sample is refused here."""
    from graphprune.tools import mnist

    data, source = mnist.load_fashion_mnist(data_dir)
    if source != data_dir:
        raise SystemExit(f"Fashion-MNIST not found in {data_dir}: apt-get install dataset-fashion-mnist "
                         "(or pass --data_dir)")
    return data


def machine() -> dict:
    return {"tensorflow": tf.__version__, "cores": os.cpu_count(),
            "reference": tfmot().__version__ if HAVE_REFERENCE else None}


def reference_keras_model(dense_module):
    """The same CNN as graphprune.mnist.MnistCNN in tf-keras, with the module's weights copied in."""
    keras = tf.keras
    model = keras.Sequential([
        keras.layers.InputLayer(input_shape=(28, 28, 1)),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu", name="dense1"),
        keras.layers.Dense(10, name="dense2"),
    ])
    m = dense_module
    model.set_weights([v.numpy() for v in (m.conv1, m.conv1_bias, m.conv2, m.conv2_bias, m.dense1, m.dense1_bias,
                                           m.dense2, m.dense2_bias)])
    return model


def make_train_step(forward, variables, before=None, learning_rate=1e-3, teacher=None, temperature=4.0):
    """One tf.function step: optional `before()` (a mask update) traced in, then Adam on the loss.

    With a `teacher` (a model's forward), the loss is half the cross-entropy and half the
    distillation loss: temperature**2 x KL(teacher || student) of the logits softened by
    `temperature` (Hinton et al.)."""
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function
    def step(images, labels):
        if before is not None:
            before()
        with tf.GradientTape() as tape:
            logits = forward(images)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
            if teacher is not None:
                target = tf.nn.softmax(tf.stop_gradient(teacher(images)) / temperature)
                student = tf.nn.log_softmax(logits / temperature)
                kl = tf.reduce_sum(target * (tf.math.log(target + 1e-12) - student), axis=-1)
                loss = 0.5 * loss + 0.5 * temperature ** 2 * tf.reduce_mean(kl)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def batches(data: dict, batch_size: int, epochs: int, seed: int):
    """The same shuffled batches, in the same order, for every model trained with `seed`."""
    rng = np.random.RandomState(seed)
    x, y = data["x_train"], data["y_train"]
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield x[index], y[index]


def steps_per_epoch(data: dict, batch_size: int) -> int:
    return len(data["x_train"]) // batch_size


def train(step, data, batch_size, epochs, seed, every=None, probe=None):
    """Run `step` over the batches; returns (last loss, seconds per step after warm-up, probes).

    probe(step_index) is called every `every` steps (and after the last) and its values kept.
    """
    probes, loss, started, warm = [], None, None, 20
    count = 0
    for count, (images, labels) in enumerate(batches(data, batch_size, epochs, seed), start=1):
        loss = step(tf.constant(images), tf.constant(labels))
        if count == warm:
            float(loss)
            started = time.perf_counter()
        if probe is not None and every and count % every == 0:
            probes.append(probe(count))
    float(loss)
    seconds = (time.perf_counter() - started) / max(count - warm, 1) if started else float("nan")
    if probe is not None and every and count % every:
        probes.append(probe(count))
    return float(loss), seconds, probes


def accuracy(forward, data: dict, batch_size: int = 1000) -> float:
    x, y = data["x_test"], data["y_test"]
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = forward(tf.constant(x[start:start + batch_size]))
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[start:start + batch_size]))
    return correct / len(x)


def reference_sparsity(model) -> float:
    """Zero fraction of the reference's masks over its pruned kernels."""
    zeros = total = 0
    for layer in model.layers:
        for _, mask, _ in getattr(layer, "pruning_vars", ()):
            values = mask.numpy()
            zeros += int(values.size - np.count_nonzero(values))
            total += values.size
    return zeros / total if total else 0.0


def write_json(name: str, payload: dict, directory: str = RESULTS) -> str:
    """Write results/<name>.json atomically; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
    os.replace(partial, path)
    return path


def read_json(name: str, directory: str = RESULTS) -> dict | None:
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)
