"""The demo's model and data (not the library): the classic MNIST CNN as a plain tf.Module, and Fashion-MNIST without network.

    conv 5x5x32 (SAME, relu) -> max-pool 2 -> conv 5x5x64 (SAME, relu) -> max-pool 2
    -> dense 3136x1024 (relu) -> dense 1024x10            (3,274,634 parameters; 3.27M weights)

Data: the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, idx .gz files)
when present, else the sample shipped in graphprune/tools/data (the first 2,000 training and 500 test
images of Fashion-MNIST, MIT licence; made by ``make_sample``).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow as tf

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SAMPLE = os.path.join(os.path.dirname(__file__), "data", "fashion_mnist_sample.npz")
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def glorot(rng, *shape) -> np.ndarray:
    """Glorot-uniform initial values of ``shape`` (float32) from ``rng``."""
    fan_in = int(np.prod(shape[:-1]))
    fan_out = shape[-1] * (int(np.prod(shape[:-2])) if len(shape) > 2 else 1)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


class MnistCNN(tf.Module):
    """The classic MNIST CNN (TF Model Optimization's pruning tutorial), no Keras: conv 5x5
    (``widths[0]``), conv 5x5 (``widths[1]``), dense (``widths[2]``), dense 10."""

    def __init__(self, seed: int = 0, widths=(32, 64, 1024)):
        super().__init__(name="mnist_cnn")
        rng = np.random.RandomState(seed)
        c1, c2, hidden = self.widths = tuple(int(w) for w in widths)
        self.conv1 = tf.Variable(glorot(rng, 5, 5, 1, c1), name="conv1/kernel")
        self.conv1_bias = tf.Variable(np.zeros(c1, np.float32), name="conv1/bias")
        self.conv2 = tf.Variable(glorot(rng, 5, 5, c1, c2), name="conv2/kernel")
        self.conv2_bias = tf.Variable(np.zeros(c2, np.float32), name="conv2/bias")
        self.dense1 = tf.Variable(glorot(rng, 7 * 7 * c2, hidden), name="dense1/kernel")
        self.dense1_bias = tf.Variable(np.zeros(hidden, np.float32), name="dense1/bias")
        self.dense2 = tf.Variable(glorot(rng, hidden, 10), name="dense2/kernel")
        self.dense2_bias = tf.Variable(np.zeros(10, np.float32), name="dense2/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="image")])
    def __call__(self, image):
        x = tf.nn.relu(tf.nn.conv2d(image, self.conv1, 1, "SAME") + self.conv1_bias)
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.nn.relu(tf.nn.conv2d(x, self.conv2, 1, "SAME") + self.conv2_bias)
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.reshape(x, [-1, 7 * 7 * self.widths[1]])
        x = tf.nn.relu(tf.matmul(x, self.dense1) + self.dense1_bias)
        return tf.matmul(x, self.dense2) + self.dense2_bias


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(data_dir: str | None = DEBIAN_DIR) -> tuple[dict, str]:
    """({x_train, y_train, x_test, y_test} as float32 [N, 28, 28, 1] in [0, 1] / int32, source)."""
    if data_dir and all(os.path.exists(os.path.join(data_dir, f)) for f in FILES.values()):
        arrays = {key: _read_idx(os.path.join(data_dir, name)) for key, name in FILES.items()}
        source = data_dir
    else:
        with np.load(SAMPLE) as sample:
            arrays = {key: sample[key] for key in FILES}
        source = f"{SAMPLE} (sample: install dataset-fashion-mnist for the full data)"
    for key in ("x_train", "x_test"):
        arrays[key] = (arrays[key].astype(np.float32) / 255.0)[..., np.newaxis]
    for key in ("y_train", "y_test"):
        arrays[key] = arrays[key].astype(np.int32)
    return arrays, source


def make_sample(path: str = SAMPLE, data_dir: str = DEBIAN_DIR, train: int = 2000, test: int = 500) -> None:
    """Write the shipped sample from the Debian package's files."""
    arrays = {key: _read_idx(os.path.join(data_dir, name)) for key, name in FILES.items()}
    np.savez_compressed(path, x_train=arrays["x_train"][:train], y_train=arrays["y_train"][:train],
                        x_test=arrays["x_test"][:test], y_test=arrays["y_test"][:test])


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(tf.constant(images[start:start + batch_size]))
        if isinstance(logits, dict):
            logits = next(iter(logits.values()))
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels[start:start + batch_size]))
    return correct / len(images)
