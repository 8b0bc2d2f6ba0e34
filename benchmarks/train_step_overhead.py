"""Train-step time, pruned vs dense, on the classic MNIST CNN, measured in one run.

Two pruned variants: update_masks() called from Python before each step (as in the README), and
traced into the train step's own tf.function (one dispatch per step). Two diagnostic arms split
the overhead: the pruned model trained without any update_masks() (masked forward/backward only)
and the dense SavedModel graphprune starts from, trained as tf.saved_model.load returns it.

    python benchmarks/train_step_overhead.py [--steps=60 --repeats=5 --batch_size=64]

With tf-keras and tensorflow-model-optimization installed, the same CNN in tf-keras (dense) and
wrapped by the reference's prune_low_magnitude are timed in the same run, each in the same kind of
tf.function step; the reference's ratio is against the tf-keras dense step.

All models train the same way (Adam, softmax cross-entropy, same batches); the pruned step is
`pm.update_masks()` + the masked forward/backward, with a PolynomialDecay schedule (0 -> 0.9,
frequency 100), so mask recomputation happens on its real share of steps. Dense and pruned blocks
alternate and the median block time is reported, which keeps machine noise out of the ratio.
Target (issue #3): pruned/dense <= 1.03.
"""

import os
import statistics
import sys
import tempfile
import time

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402
from graphprune.tools.mnist import MnistCNN  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 60, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed blocks per model (alternating).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REFERENCE = flags.DEFINE_bool("reference", bc.HAVE_REFERENCE, "Also time the reference toolkit (tf-keras).")


def _reference_arms(dense, end_step):
    """(keras dense step, reference pruned step): the same CNN in tf-keras, and wrapped by tfmot."""
    sparsity = bc.tfmot().sparsity.keras
    keras_dense = bc.reference_keras_model(dense)
    pruned = sparsity.prune_low_magnitude(
        bc.reference_keras_model(dense),
        pruning_schedule=sparsity.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=end_step, frequency=100))
    callback = sparsity.UpdatePruningStep()
    callback.set_model(pruned)
    callback.on_train_begin()
    return (bc.make_train_step(lambda x: keras_dense(x, training=True), keras_dense.trainable_variables),
            bc.make_train_step(lambda x: pruned(x, training=True), pruned.trainable_variables), pruned)


def main(argv):
    del argv
    bc.quiet()
    rng = np.random.RandomState(0)
    images = tf.constant(rng.uniform(size=[_BATCH.value, 28, 28, 1]).astype(np.float32))
    labels = tf.constant(rng.randint(0, 10, _BATCH.value).astype(np.int32))
    dense = MnistCNN(seed=0)
    path = os.path.join(tempfile.mkdtemp(), "dense")
    tf.saved_model.save(dense, path, signatures={"serving_default": dense.__call__})
    end_step = 10 * _STEPS.value
    pm = graphprune.prune(path, schedule=graphprune.PolynomialDecay(0.0, 0.9, 0, end_step, frequency=100))
    pm_fused = graphprune.prune(path, schedule=graphprune.PolynomialDecay(0.0, 0.9, 0, end_step, frequency=100))
    pm_masks_only = graphprune.prune(path, schedule=graphprune.PolynomialDecay(0.0, 0.9, 0, end_step, frequency=100))
    reloaded = tf.saved_model.load(path)
    steps = {
        "dense": bc.make_train_step(dense, dense.trainable_variables),
        "dense, tf.saved_model.load": bc.make_train_step(
            reloaded.__call__, [v for v in reloaded.signatures["serving_default"].variables if v.trainable]),
        "graphprune, masked forward only": bc.make_train_step(pm_masks_only, pm_masks_only.trainable_variables),
        "graphprune, update_masks() from Python": bc.make_train_step(pm, pm.trainable_variables),
        "graphprune, update_masks() in the step": bc.make_train_step(pm_fused, pm_fused.trainable_variables,
                                                                     before=pm_fused.update_masks),
    }
    reference = None
    if _REFERENCE.value:
        steps["tf-keras dense"], steps["reference pruned"], reference = _reference_arms(dense, end_step)

    def block(name):
        step, eager_update = steps[name], name.endswith("from Python")
        for _ in range(_STEPS.value):
            if eager_update:
                pm.update_masks()
            loss = step(images, labels)
        float(loss)

    for name in steps:
        block(name)  # warm up: trace and first mask update
    times = {name: [] for name in steps}
    for _ in range(_REPEATS.value):
        for name in steps:
            started = time.perf_counter()
            block(name)
            times[name].append((time.perf_counter() - started) / _STEPS.value)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"MNIST CNN, batch {_BATCH.value}, {_STEPS.value} steps x {_REPEATS.value} blocks, tf {tf.__version__}, "
          f"{os.cpu_count()} cores; median block")
    baselines = {name: "tf-keras dense" if name.startswith(("tf-keras", "reference")) else "dense" for name in steps}
    for name in steps:
        print(f"{name:40s} {ms[name]:7.2f} ms/step  ratio {ms[name] / ms[baselines[name]]:.3f} vs {baselines[name]}"
              f"  (blocks {[round(t * 1e3, 1) for t in times[name]]})")
    sparsities = {"graphprune": pm.sparsity(), "graphprune traced": pm_fused.sparsity()}
    if reference is not None:
        sparsities["reference"] = bc.reference_sparsity(reference)
    print("sparsity after the run: " + ", ".join(f"{k} {v:.3f}" for k, v in sparsities.items()))
    result = {"machine": bc.machine(), "batch_size": _BATCH.value, "steps": _STEPS.value, "repeats": _REPEATS.value,
              "ms_per_step": ms, "blocks_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
              "baseline": baselines, "sparsity": sparsities}
    print(f"wrote {bc.write_json('train_step_overhead', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
