"""Time of one mask update (the step that recomputes masks) vs parameter count, layer-wise and
global, on MLPs of growing width.

    python benchmarks/mask_update_time.py [--sizes=1e5,1e6,3e6,1e7,3e7 --repeats=3]
"""

import os
import statistics
import sys
import time

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402

_SIZES = flags.DEFINE_list("sizes", ["1e5", "1e6", "3e6", "1e7", "3e7"], "Total weight counts.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Updates timed per configuration (median reported).")


class MLP(tf.Module):
    """Three square dense layers holding about `parameters` weights."""

    def __init__(self, parameters):
        super().__init__()
        width = int(np.sqrt(parameters / 3))
        rng = np.random.RandomState(0)
        self.width = width
        self.kernels = [tf.Variable(rng.standard_normal([width, width]).astype(np.float32), name=f"dense_{i}/kernel")
                        for i in range(3)]
        self.call = tf.function(self._call, input_signature=[tf.TensorSpec([None, width], tf.float32)])

    def _call(self, x):
        for kernel in self.kernels:
            x = tf.nn.relu(tf.matmul(x, kernel))
        return x


def time_update(parameters, scope):
    model = MLP(parameters)
    pm = graphprune.prune(model.call, schedule=graphprune.ConstantSparsity(0.9, 0, frequency=1), scope=scope)
    pm.update_masks()  # trace
    times = []
    for _ in range(_REPEATS.value):
        started = time.perf_counter()
        pm.update_masks()
        float(pm.masks[0][0, 0])
        times.append(time.perf_counter() - started)
    return 3 * model.width**2, statistics.median(times)


def main(argv):
    del argv
    print(f"tf {tf.__version__}, {os.cpu_count()} cores; median of {_REPEATS.value} updates at sparsity 0.9")
    print(f"{'parameters':>12s} {'layer-wise ms':>14s} {'global ms':>10s} {'ns/param (layer)':>17s}")
    rows = []
    for size in _SIZES.value:
        count, layer = time_update(float(size), "layer")
        _, global_ = time_update(float(size), "global")
        print(f"{count:12d} {layer * 1e3:14.1f} {global_ * 1e3:10.1f} {layer / count * 1e9:17.1f}", flush=True)
        rows.append({"parameters": count, "layer_ms": layer * 1e3, "global_ms": global_ * 1e3})
    print(f"wrote {bc.write_json('mask_update_time', {'machine': bc.machine(), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
