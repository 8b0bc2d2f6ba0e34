"""Accuracy vs sparsity on Fashion-MNIST: dense, graphprune layer-wise, graphprune global and the
reference toolkit (tensorflow-model-optimization's prune_low_magnitude), measured in one run.

    python benchmarks/accuracy_vs_sparsity.py [--sparsities=0.5,0.75,0.9,0.95 --finetune_epochs=2]

Protocol (the same for every arm): the classic MNIST CNN (graphprune.mnist.MnistCNN; the reference
gets the same layers in tf-keras, weights copied) is trained dense for --pretrain_epochs; then each
arm fine-tunes a copy of those weights for --finetune_epochs with a fresh Adam(1e-3), batch 64, the
same shuffled batches (seed), softmax cross-entropy, and PolynomialDecay(0 -> target, begin 0, end at
--ramp_fraction of the fine-tuning steps rounded down to a multiple of the frequency, power 3,
frequency 100). The dense arm fine-tunes without pruning; it is the 0% point of every curve. Test
accuracy is on all 10,000 test images.

graphprune's mask update is traced into the train step (`pm.update_masks()` inside the step's
tf.function), as the reference's update is traced into its wrapper's call. The 90% models are kept
under results/models/ for benchmarks/artifact_sizes.py. Results: results/accuracy_vs_sparsity.json.
"""

import os
import shutil
import sys
import tempfile
import time

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402
from graphprune.tools.mnist import MnistCNN  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST idx .gz files.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.75", "0.9", "0.95"], "Target sparsities.")
_METHODS = flags.DEFINE_list("methods", ["layer", "global", "reference"], "Pruning arms besides dense.")
_PRETRAIN = flags.DEFINE_integer("pretrain_epochs", 2, "Dense epochs before pruning.")
_FINETUNE = flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs of every arm.")
_RAMP = flags.DEFINE_float("ramp_fraction", 0.6, "Schedule end_step as a fraction of the fine-tuning steps.")
_FREQUENCY = flags.DEFINE_integer("frequency", 100, "Pruning frequency (steps).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Initial weights and batch order.")
_PROBE_EVERY = flags.DEFINE_integer("probe_every", 50, "Record the sparsity every this many steps.")
_EXAMPLES = flags.DEFINE_integer("train_examples", None, "Use only the first N training images (quick checks).")
_KEEP = flags.DEFINE_float("keep_models_at", 0.9, "Keep the models pruned to this target for artifact_sizes.py "
                           "(negative: keep none).")
_NAME = flags.DEFINE_string("name", "accuracy_vs_sparsity", "Results file: results/<name>.json.")


def _log(message):
    print(message, flush=True)


def _graphprune_arm(dense_dir, schedule, scope, data, seed):
    pm = graphprune.prune(dense_dir, schedule=schedule, scope=scope)
    step = bc.make_train_step(pm, pm.trainable_variables, before=pm.update_masks)
    loss, seconds, ramp = bc.train(step, data, _BATCH.value, _FINETUNE.value, seed, every=_PROBE_EVERY.value,
                                   probe=lambda i: (i, pm.sparsity()))
    return pm, loss, seconds, ramp, bc.accuracy(pm, data), pm.sparsity()


def _reference_arm(dense, schedule_args, data, seed):
    tfmot = bc.tfmot()
    sparsity = tfmot.sparsity.keras
    model = bc.reference_keras_model(dense)
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=sparsity.PolynomialDecay(**schedule_args))
    callback = sparsity.UpdatePruningStep()
    callback.set_model(pruned)
    callback.on_train_begin()  # pruning_step -1 -> 0, as fit() does
    step = bc.make_train_step(lambda x: pruned(x, training=True), pruned.trainable_variables)
    loss, seconds, ramp = bc.train(step, data, _BATCH.value, _FINETUNE.value, seed, every=_PROBE_EVERY.value,
                                   probe=lambda i: (i, bc.reference_sparsity(pruned)))
    callback.on_epoch_end(-1)  # as fit() does at the end of an epoch: weights := weights * masks
    stripped = sparsity.strip_pruning(pruned)
    kernels = [w.numpy() for w in stripped.weights if "kernel" in w.name]
    final_sparsity = 1.0 - sum(np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)
    return stripped, loss, seconds, ramp, bc.accuracy(lambda x: stripped(x, training=False), data), final_sparsity


def _save_reference(model, path):
    spec = tf.TensorSpec([None, 28, 28, 1], tf.float32, name="image")
    serve = tf.function(lambda image: model(image, training=False), input_signature=[spec])
    shutil.rmtree(path, ignore_errors=True)
    tf.saved_model.save(model, path, signatures={"serving_default": serve})


def main(argv):
    del argv
    bc.quiet()
    if "reference" in _METHODS.value:
        bc.tfmot()
    data = bc.require_full_data(_DATA_DIR.value)
    if _EXAMPLES.value:
        data["x_train"], data["y_train"] = data["x_train"][:_EXAMPLES.value], data["y_train"][:_EXAMPLES.value]
    seed = _SEED.value
    started = time.time()
    models_dir = os.path.join(bc.RESULTS, "models")
    os.makedirs(models_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gp-bench-")

    dense = MnistCNN(seed=seed)
    step = bc.make_train_step(dense, dense.trainable_variables)
    bc.train(step, data, _BATCH.value, _PRETRAIN.value, seed)
    pretrained = bc.accuracy(dense, data)
    _log(f"dense pretrained {_PRETRAIN.value} epochs: accuracy {pretrained:.4f} ({time.time() - started:.0f}s)")
    dense_dir = os.path.join(work, "dense")
    tf.saved_model.save(dense, dense_dir, signatures={"serving_default": dense.__call__})
    if "reference" in _METHODS.value:
        check = bc.reference_keras_model(dense)
        sample = tf.constant(data["x_test"][:256])
        difference = float(np.max(np.abs(check(sample) - dense(sample))))
        assert difference < 1e-4, f"reference model differs from the module by {difference}"

    steps = bc.steps_per_epoch(data, _BATCH.value) * _FINETUNE.value
    # A multiple of the frequency, so that the last update lands on end_step with the full target.
    end_step = int(steps * _RAMP.value) // _FREQUENCY.value * _FREQUENCY.value
    finetune_seed = seed + 1
    runs = []

    copy = MnistCNN(seed=seed)
    for target, source in zip(copy.trainable_variables, dense.trainable_variables):
        target.assign(source)
    step = bc.make_train_step(copy, copy.trainable_variables)
    loss, seconds, _ = bc.train(step, data, _BATCH.value, _FINETUNE.value, finetune_seed)
    runs.append({"method": "dense", "target": 0.0, "accuracy": bc.accuracy(copy, data), "sparsity": 0.0,
                 "loss": loss, "ms_per_step": seconds * 1e3, "ramp": []})
    _log(f"dense fine-tuned: accuracy {runs[-1]['accuracy']:.4f}, {seconds * 1e3:.1f} ms/step")
    if _KEEP.value >= 0:
        keep_dense = os.path.join(models_dir, "dense")
        shutil.rmtree(keep_dense, ignore_errors=True)
        tf.saved_model.save(copy, keep_dense, signatures={"serving_default": copy.__call__})

    for target in (float(s) for s in _SPARSITIES.value):
        schedule_args = dict(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step,
                             power=3, frequency=_FREQUENCY.value)
        schedule = graphprune.PolynomialDecay(0.0, target, 0, end_step, power=3, frequency=_FREQUENCY.value)
        keep = abs(target - _KEEP.value) < 1e-9
        for method in _METHODS.value:
            if method == "reference":
                model, loss, seconds, ramp, acc, final = _reference_arm(dense, schedule_args, data, finetune_seed)
                if keep:
                    _save_reference(model, os.path.join(models_dir, f"reference_{int(target * 100)}"))
            else:
                model, loss, seconds, ramp, acc, final = _graphprune_arm(dense_dir, schedule, method, data,
                                                                         finetune_seed)
                if keep:
                    path = os.path.join(models_dir, f"graphprune_{method}_{int(target * 100)}")
                    graphprune.finalize(model, path, overwrite=True)
                    loaded = tf.saved_model.load(path)
                    final_acc = bc.accuracy(lambda x: loaded(x), data)
                    assert abs(final_acc - acc) < 1e-3, (final_acc, acc)
            runs.append({"method": method, "target": target, "accuracy": acc, "sparsity": final, "loss": loss,
                         "ms_per_step": seconds * 1e3, "ramp": ramp})
            _log(f"{method:9s} target {target:.2f}: accuracy {acc:.4f}, sparsity {final:.4f}, loss {loss:.3f}, "
                 f"{seconds * 1e3:.1f} ms/step ({time.time() - started:.0f}s)")

    payload = {"machine": bc.machine(), "pretrained_accuracy": pretrained, "runs": runs,
               "config": {"pretrain_epochs": _PRETRAIN.value, "finetune_epochs": _FINETUNE.value,
                          "batch_size": _BATCH.value, "optimizer": "Adam(1e-3)", "seed": seed,
                          "schedule": f"PolynomialDecay(0 -> target, begin 0, end {end_step}, power 3, "
                                      f"frequency {_FREQUENCY.value})",
                          "finetune_steps": steps, "end_step": end_step, "data": _DATA_DIR.value}}
    _log(f"wrote {bc.write_json(_NAME.value, payload)} ({time.time() - started:.0f}s)")
    print("\n| target | dense | " + " | ".join(_METHODS.value) + " |")
    print("|---|---|" + "---|" * len(_METHODS.value))
    dense_acc = runs[0]["accuracy"]
    for target in (float(s) for s in _SPARSITIES.value):
        row = {r["method"]: r["accuracy"] for r in runs if r["target"] == target}
        print(f"| {target:.0%} | {dense_acc:.4f} | " + " | ".join(f"{row[m]:.4f}" for m in _METHODS.value) + " |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
