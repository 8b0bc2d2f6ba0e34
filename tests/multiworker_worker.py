"""One worker of the MultiWorkerMirroredStrategy test: prunes while training, saves its masks.

    python multiworker_worker.py INDEX PORT0 PORT1 OUT_DIR
"""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
index, port0, port1, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
    "task": {"type": "worker", "index": index},
})

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphprune  # noqa: E402
import testmodels  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = testmodels.MLP(seed=0)
    pm = graphprune.prune(model, schedule=graphprune.PolynomialDecay(0.0, 0.75, 0, 12, frequency=4))
    optimizer = tf.keras.optimizers.SGD(0.05)

rng = np.random.RandomState(index)  # each worker sees different data
x = rng.standard_normal([32, 8]).astype(np.float32)
y = rng.standard_normal([32, 4]).astype(np.float32)


@tf.function
def train_step(xb, yb):
    def step(xr, yr):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((pm(xr) - yr) ** 2)
        grads = tape.gradient(loss, pm.trainable_variables)
        optimizer.apply_gradients(zip(grads, pm.trainable_variables))
        return loss

    return strategy.run(step, args=(xb, yb))


for _ in range(16):
    pm.update_masks()
    train_step(x, y)

np.savez(os.path.join(out_dir, f"worker{index}.npz"),
         **{m.name.replace("/", "_"): m.numpy() for m in pm.masks},
         **{w.name.replace("/", "_"): w.numpy() for w in pm.pruned_weights})
