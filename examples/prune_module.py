"""Prune a plain tf.Module (no Keras) in your own GradientTape loop.

    python examples/prune_module.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphprune  # noqa: E402


class Regressor(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.hidden = tf.Variable(rng.standard_normal([16, 64]).astype(np.float32) * 0.25, name="hidden/kernel")
        self.bias = tf.Variable(np.zeros(64, np.float32), name="hidden/bias")
        self.out = tf.Variable(rng.standard_normal([64, 1]).astype(np.float32) * 0.125, name="out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32)])
    def __call__(self, x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, self.hidden) + self.bias), self.out)


def main():
    rng = np.random.RandomState(1)
    x = rng.standard_normal([512, 16]).astype(np.float32)
    y = (x[:, :4].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal([512, 1])).astype(np.float32)

    model = Regressor()
    steps = 300
    pm = graphprune.prune(model, schedule=graphprune.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=200,
                                                                     frequency=20))
    optimizer = tf.keras.optimizers.Adam(0.01)
    for step in range(steps):
        state = pm.update_masks()  # once per training step
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((pm(x) - y) ** 2)
        grads = tape.gradient(loss, pm.trainable_variables)
        optimizer.apply_gradients(zip(grads, pm.trainable_variables))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {int(state['step']):4d}  loss {float(loss):.4f}  target {float(state['target_sparsity']):.3f}"
                  f"  sparsity {pm.sparsity():.3f}")
    for row in pm.weights():
        print(f"{row['name']:14s} {row['op']:8s} {str(row['shape']):10s} sparsity {row['sparsity']:.3f}")


if __name__ == "__main__":
    main()
