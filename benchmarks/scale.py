"""Scale: time and peak memory of each stage of graphprune against plain TensorFlow, on models of
100M to 1B parameters, each stage in a process of its own (peak RSS is per process).

    python benchmarks/scale.py [--params=100e6,400e6,1e9 --keras_hub=gpt2_medium --scratch=/tmp/gp-scale]

The model is a plain tf.Module: a stack of MatMul weights 4096x4096 (16.8M parameters each) and
their biases. Plain TensorFlow, measured in the same run on the same model:
    tf_save       build the model (random weights) and tf.saved_model.save it
    tf_load_save  tf.saved_model.load it and save it again (the memory baseline: 2x is the bound)
    tf_load       load the saved model and call it once
graphprune:
    prune         graphprune.prune(saved model, schedule) [+ graphprune.save]
    update        reload the prunable model, update_masks() (the step that recomputes every mask;
                  layer-wise and global), graphprune.save
    finalize      graphprune.finalize(prunable dir, final dir) with the default settings
    load_final    tf.saved_model.load the finalized model (no graphprune) and call it once
--keras_hub=gpt2_medium (or bert_large) adds a keras-hub backbone of that configuration with
random weights (about 350M parameters), exported with model.export and run through the same
stages. Results: benchmarks/results/scale.json; --plot writes benchmarks/scale.png.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH = 4096


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Stages (each run in its own process by the driver below).
# ---------------------------------------------------------------------------------------------

def _stack_module(parameters: float):
    import tensorflow as tf

    count = max(1, round(parameters / (WIDTH * WIDTH)))

    class Stack(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernels, self.biases = [], []
            for index in range(count):
                seed = tf.constant([index, 7], tf.int32)
                value = tf.random.stateless_normal([WIDTH, WIDTH], seed, stddev=1.0 / WIDTH ** 0.5)
                self.kernels.append(tf.Variable(value, name=f"dense_{index}/kernel"))
                del value
                self.biases.append(tf.Variable(tf.zeros([WIDTH]), name=f"dense_{index}/bias"))

        @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32)])
        def __call__(self, x):
            for kernel, bias in zip(self.kernels, self.biases):
                x = tf.nn.relu(tf.matmul(x, kernel) + bias)
            return x

    return Stack()


def _keras_hub_model(name: str, directory: str):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    if name == "gpt2_medium":
        model = keras_hub.models.GPT2Backbone(vocabulary_size=50257, num_layers=24, num_heads=16, hidden_dim=1024,
                                              intermediate_dim=4096, max_sequence_length=1024)
    elif name == "bert_large":
        model = keras_hub.models.BertBackbone(vocabulary_size=30522, num_layers=24, num_heads=16, hidden_dim=1024,
                                              intermediate_dim=4096, max_sequence_length=512)
    else:
        raise SystemExit(f"--keras_hub: unknown model {name!r} (gpt2_medium, bert_large)")
    model.export(directory, verbose=False)
    return model.count_params()


def _sample_input(loaded):
    import numpy as np
    import tensorflow as tf

    function = loaded.signatures["serving_default"]
    _, specs = function.structured_input_signature
    inputs = {}
    for key, spec in specs.items():
        shape = [2 if d is None else d for d in spec.shape]
        if spec.dtype.is_integer:
            inputs[key] = tf.constant(np.ones(shape), spec.dtype)
        elif spec.dtype == tf.bool:
            inputs[key] = tf.ones(shape, tf.bool)
        else:
            inputs[key] = tf.constant(np.random.RandomState(0).standard_normal(shape), spec.dtype)
    return function, inputs


def stage(name: str, args: dict) -> dict:
    """Run one stage in this process; returns {'seconds': {...}, 'peak_rss': bytes, ...}."""
    import tensorflow as tf

    scratch = args["scratch"]
    original, prunable = os.path.join(scratch, "original"), os.path.join(scratch, "prunable")
    updated, final = os.path.join(scratch, "updated"), os.path.join(scratch, "final")
    seconds = {}
    extra = {}
    if name == "tf_save":
        started = time.perf_counter()
        if args.get("keras_hub"):
            extra["parameters"] = _keras_hub_model(args["keras_hub"], original)
            seconds["build+export"] = time.perf_counter() - started
        else:
            module = _stack_module(args["parameters"])
            seconds["build"] = time.perf_counter() - started
            extra["parameters"] = int(sum(v.shape.num_elements() for v in module.trainable_variables))
            started = time.perf_counter()
            tf.saved_model.save(module, original)
            seconds["save"] = time.perf_counter() - started
    elif name == "tf_load_save":
        started = time.perf_counter()
        loaded = tf.saved_model.load(original)
        seconds["load"] = time.perf_counter() - started
        started = time.perf_counter()
        tf.saved_model.save(loaded, os.path.join(scratch, "resaved"))
        seconds["save"] = time.perf_counter() - started
        shutil.rmtree(os.path.join(scratch, "resaved"))
    elif name in ("tf_load", "load_final"):
        started = time.perf_counter()
        loaded = tf.saved_model.load(original if name == "tf_load" else final)
        seconds["load"] = time.perf_counter() - started
        function, inputs = _sample_input(loaded)
        started = time.perf_counter()
        function(**inputs)
        seconds["call"] = time.perf_counter() - started
    elif name == "prune":
        import graphprune

        started = time.perf_counter()
        pm = graphprune.prune(original, graphprune.ConstantSparsity(0.5, 0, frequency=1), scope=args["scope"])
        seconds["prune"] = time.perf_counter() - started
        started = time.perf_counter()
        graphprune.save(pm, prunable)
        seconds["save"] = time.perf_counter() - started
    elif name == "update":
        import graphprune

        started = time.perf_counter()
        pm = tf.saved_model.load(prunable)
        seconds["load"] = time.perf_counter() - started
        pm.update_masks()  # the first call traces; the timed ones below each recompute every mask
        float(tf.reduce_sum(tf.cast(pm.masks[0][0], tf.float32)))
        timed = []
        for _ in range(args["repeats"]):
            started = time.perf_counter()
            pm.update_masks()
            float(tf.reduce_sum(tf.cast(pm.masks[0][0], tf.float32)))  # the update has finished
            timed.append(time.perf_counter() - started)
        seconds["update_masks"] = sorted(timed)[len(timed) // 2]
        extra["masked_parameters"] = int(sum(m.shape.num_elements() for m in pm.masks))
        extra["ns_per_parameter"] = seconds["update_masks"] / extra["masked_parameters"] * 1e9
        started = time.perf_counter()
        tf.saved_model.save(pm, updated)
        seconds["save"] = time.perf_counter() - started
    elif name == "finalize":
        import graphprune

        started = time.perf_counter()
        graphprune.finalize(updated, final)
        seconds["finalize"] = time.perf_counter() - started
    else:
        raise SystemExit(f"unknown stage {name}")
    return {"stage": name, "seconds": seconds, "peak_rss": peak_rss_bytes(), **extra}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

STAGES = ("tf_save", "tf_load_save", "tf_load", "prune", "update", "finalize", "load_final")


def run_stage(name: str, args: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--stage", name, "--args", json.dumps(args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        return {"stage": name, "failed": completed.returncode, "error": " | ".join(tail)[-400:]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(label: str, args: dict, stages=STAGES) -> dict:
    shutil.rmtree(args["scratch"], ignore_errors=True)
    os.makedirs(args["scratch"])
    results = {}
    for name in stages:
        result = run_stage(name, args)
        results[name] = result
        if "failed" in result:
            print(f"  {label} {name}: FAILED ({result['failed']}): {result['error']}", flush=True)
            break
        times = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
        extra = f", {result['ns_per_parameter']:.1f} ns/param" if "ns_per_parameter" in result else ""
        print(f"  {label} {name}: peak {result['peak_rss'] / 2**30:.2f} GiB; {times}{extra}", flush=True)
    shutil.rmtree(args["scratch"], ignore_errors=True)
    return results


TF_STAGES = ("tf_save", "tf_load_save", "tf_load")
GP_STAGES = ("prune", "update", "finalize", "load_final")


def plot(results_path: str, output: str) -> str:
    """Peak memory vs parameters, plain TensorFlow (its worst stage) against graphprune's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as handle:
        rows = [row for row in json.load(handle)["rows"] if row["model"].startswith("stack")]
    figure, axis = plt.subplots(figsize=(6, 4))
    parameters = [row["stages"]["tf_save"]["parameters"] / 1e6 for row in rows]
    for label, stages, style in (("plain TensorFlow (save, load + save, load)", TF_STAGES, "o-"),
                                 ("graphprune (prune, update, finalize, load)", GP_STAGES, "s-")):
        peaks = [max(row["stages"][s].get("peak_rss", 0) for s in stages if s in row["stages"]) / 2**30 for row in rows]
        axis.plot(parameters, peaks, style, label=label)
    bound = [2 * max(row["stages"][s]["peak_rss"] for s in TF_STAGES) / 2**30 for row in rows]
    axis.plot(parameters, bound, "k:", label="2x plain TensorFlow")
    axis.set_xlabel("parameters (millions, float32)")
    axis.set_ylabel("peak RSS of the worst stage (GiB)")
    axis.set_title("Peak memory vs model size (each stage its own process)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    return output


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage")
    parser.add_argument("--args")
    parser.add_argument("--params", default="100e6,400e6,1e9")
    parser.add_argument("--keras_hub", default="gpt2_medium", help="'' to skip")
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", default=os.path.join("/tmp", "graphprune-scale"))
    parser.add_argument("--output", default=os.path.join(HERE, "results", "scale.json"))
    parser.add_argument("--plot", action="store_true", help="only draw benchmarks/scale.png from --output")
    options = parser.parse_args(argv)
    if options.plot:
        print(f"wrote {plot(options.output, os.path.join(HERE, 'scale.png'))}")
        return 0
    if options.stage:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print(json.dumps(stage(options.stage, json.loads(options.args))))
        return 0
    rows = []
    for size in filter(None, options.params.split(",")):
        args = {"parameters": float(size), "scratch": options.scratch, "scope": options.scope,
                "repeats": options.repeats}
        print(f"stack of 4096x4096 MatMuls, {float(size):.3g} parameters", flush=True)
        rows.append({"model": f"stack {float(size):.3g}", "stages": measure(f"{float(size):.3g}", args)})
    if options.keras_hub:
        args = {"keras_hub": options.keras_hub, "scratch": options.scratch, "scope": options.scope,
                "repeats": options.repeats}
        print(f"keras-hub {options.keras_hub}", flush=True)
        rows.append({"model": options.keras_hub, "stages": measure(options.keras_hub, args)})
    os.makedirs(os.path.dirname(options.output), exist_ok=True)
    with open(options.output, "w") as handle:
        json.dump({"machine": {"cores": os.cpu_count()}, "rows": rows}, handle, indent=1)
    print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
