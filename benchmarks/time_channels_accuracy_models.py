"""Idle timing of the ResNet models the 2x-speed accuracy runs saved (benchmarks/README.md, "At 2x the speed"):
per seed, the dense arms and the uniform-45% channel model of one run, the shaped channel model of the
--dense_from run, batch 256 and 1, five rounds of every model in turn, median.

    python benchmarks/time_channels_accuracy_models.py OLD_DIR,NEW_DIR ...   (one pair per seed, in seed order)

OLD_DIR: the "saved models" directory of the --ratio=0.45 run; NEW_DIR: of the shaped --dense_from run.
Results: results/channels_accuracy_resnet_2x_timings.json."""
import json
import os
import sys
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

pairs = [a.split(",") for a in sys.argv[1:]]  # old_dir,new_dir
out = {}
for seed, (old, new) in enumerate(pairs):
    paths = {"dense": f"{old}/resnet_dense", "dense_longer": f"{old}/resnet_dense_longer",
             "uniform45": f"{old}/resnet_channel", "shaped": f"{new}/resnet_channel"}
    fns = {k: tf.saved_model.load(p).signatures["serving_default"] for k, p in paths.items()}
    res = {}
    for b in (256, 1):
        x = tf.constant(np.random.RandomState(0).rand(b, 28, 28, 1).astype(np.float32))
        for f in fns.values():
            for _ in range(3):
                f(image=x)
        t = {k: [] for k in fns}
        for _ in range(5):
            for k, f in fns.items():
                ts = []
                for _ in range(10 if b == 256 else 30):
                    s = time.perf_counter()
                    f(image=x)
                    ts.append(time.perf_counter() - s)
                t[k].append(np.median(ts) * 1000)
        for k, v in t.items():
            res[f"{k}_b{b}_ms"] = float(np.median(v))
    out[f"seed{seed}"] = res
    ratios = tuple(res[f"{k}_b{b}_ms"] / res[f"dense_b{b}_ms"] for k in ("uniform45", "shaped") for b in (256, 1))
    print(seed, {k: round(v, 2) for k, v in res.items()}, "uniform45 %.2f/%.2f shaped %.2f/%.2f" % ratios, flush=True)
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "channels_accuracy_resnet_2x_timings.json"), "w"), indent=1)
