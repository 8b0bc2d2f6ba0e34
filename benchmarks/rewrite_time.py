"""Rewrite (prune) and finalize time per zoo model vs a plain tf.saved_model.load + save, one run.

    python benchmarks/rewrite_time.py [--models=ResNet50,MobileNetV2,EfficientNetB0]

Target (issue #6): for ResNet50, both rewrite and finalize within 2x of load + save.
"""

import os
import sys
import tempfile
import time
import warnings

import bench_common as bc  # sets the environment before TensorFlow is imported

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["MobileNetV2", "EfficientNetB0", "ResNet50"], "keras.applications models.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")


def main(argv):
    del argv
    import keras

    warnings.simplefilter("ignore")
    root = tempfile.mkdtemp()
    print(f"tf {tf.__version__}, {os.cpu_count()} cores, input {_SIZE.value}x{_SIZE.value}, random weights")
    print(f"{'model':16s} {'weights':>8s} {'params':>10s} {'load+save s':>12s} {'prune s':>8s} {'ratio':>6s} "
          f"{'save+finalize s':>16s} {'ratio':>6s}")
    rows = []
    for name in _MODELS.value:
        model = getattr(keras.applications, name)(weights=None, input_shape=(_SIZE.value, _SIZE.value, 3))
        source = os.path.join(root, name)
        model.export(source, verbose=False)
        params = model.count_params()
        del model
        started = time.perf_counter()
        tf.saved_model.save(tf.saved_model.load(source), os.path.join(root, name + "_resaved"))
        baseline = time.perf_counter() - started
        started = time.perf_counter()
        pm = graphprune.prune(source, schedule=graphprune.ConstantSparsity(0.5, 0))
        rewrite = time.perf_counter() - started
        started = time.perf_counter()
        graphprune.finalize(pm, os.path.join(root, name + "_final"))
        finalize = time.perf_counter() - started
        print(f"{name:16s} {len(pm.weights()):8d} {params:10d} {baseline:12.1f} {rewrite:8.1f} {rewrite / baseline:6.2f} "
              f"{finalize:16.1f} {finalize / baseline:6.2f}", flush=True)
        rows.append({"model": name, "weights": len(pm.weights()), "parameters": params, "baseline_s": baseline,
                     "prune_s": rewrite, "finalize_s": finalize})
    print(f"wrote {bc.write_json('rewrite_time', {'machine': bc.machine(), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
