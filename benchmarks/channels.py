"""Channel pruning: parameters, FLOPs and latency of dense against shrunk models.

    python benchmarks/channels.py [--models=ResNet50,MobileNetV2 --ratios=0.25,0.5,0.75 --size=128]
    python benchmarks/channels.py --plot        (benchmarks/channels.png from the saved results)
    python benchmarks/channels.py --ratios=0.5 --results=channels_repeat_50.json   (a second run of
                                                the 50% rows, to results/channels_repeat_50.json)
    python benchmarks/channels.py --models=MobileNetV2 --ratios=0.5 --round_to=1   (kept counts not rounded;
                                                results/channels_round_to_1.json)
    python benchmarks/channels.py --models=MobileNetV2 --ratios=0.5 --variants=final,frozen --processes=10 \
        --results=channels_processes.json   (these variants alone, each timed in 10 fresh processes:
                                                the median and spread of the per-process ratios)
    python benchmarks/channels.py --ratios=0.5 --onednn=0    (TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's own
                                                kernels; results/channels_onednn_off.json)

Each keras.applications model is built with random weights (its batch-norm statistics taken from
random inputs), exported, pruned one-shot with structure='channel' (L2 group norms, kept counts
rounded up to a multiple of 8) at each ratio of channels removed per group, and finalized with
shrink=True. For the dense model and each shrunk one, on this machine:

    parameters, FLOPs  graphprune.cost (FLOPs: 2 x multiply-adds of convolutions and matmuls) of
                       the Keras export and of the shrunk model with its batch norms not folded;
                       "trainable": without the batch-norm moving statistics (Cost.non_trainable),
                       as PyTorch counts parameters (benchmarks/torch_pruning_reference.py); "as
                       timed" (timed_parameters): the parameters of the two SavedModels the row
                       times, where they differ (batch norms folded: one bias per channel)
    tf_b1, tf_b32      median latency of the SavedModel's serving function (TensorFlow, its default
                       threads: all cores) at batch 1 and 32: the Keras export against
                       finalize(shrink=True)'s output ("export"); both through finalize's
                       defaults ("final"); both through finalize(freeze='all') ("frozen": every
                       variable a constant). finalize's defaults fold the batch norms into the
                       kernels (fold_batch_norms; "unfolded": "export" with
                       fold_batch_norms=False, finalize's output before they did) and write 1x1
                       convolutions of at most 3.5M multiply-adds per image as MatMuls
                       (pointwise_matmul="auto"); "export_conv" and "frozen_conv" are "export"
                       and "frozen" with pointwise_matmul=False in every finalize (the Keras
                       export as it is)
    tf1_b1, tf1_b32    the same with TensorFlow on 1 thread (intra- and inter-op), as LiteRT runs and
                       as the issue's Torch-Pruning figures were taken (--threads=default,1: each
                       setting timed in a fresh process)
    litert             median latency of the float .tflite under LiteRT, 1 thread, batch 1 (of the
                       finalize(shrink=True) model: every variant's row repeats it)
    max_diff           largest |masked - shrunk| output difference over the output scale

The latencies of one model and variant (dense and every ratio) are taken in turn: five rounds,
in each a block of calls to every model (--repeats calls per model in all, a quarter of that at
batch 32), so that a slow stretch of the machine falls on all of them alike.

Results: benchmarks/results/channels.json. Targets (issue #17) at 50% channels: ResNet50 at most
0.30x the parameters and 0.40x the dense latency in both runtimes; MobileNetV2 at most 0.35x the
parameters and 0.60x the latency.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "channels.json")


def _median_ms_in_rounds(runs: list, repeats: int, rounds: int = 5) -> list[float]:
    """Median milliseconds of each callable over ``repeats`` calls, taken in ``rounds`` rounds: in
    each round every callable in turn gets one untimed call and a block of timed ones. A slow
    stretch of the machine falls on all of them alike, and each block runs with its own model's
    weights in the caches, as a server calling one model does (one call of each in turn would
    time every model with its caches cold)."""
    import numpy as np

    block = max(1, -(-repeats // rounds))
    times = [[] for _ in runs]
    for _ in range(rounds):
        for run, kept in zip(runs, times):
            run()
            for _ in range(block):
                start = time.perf_counter()
                run()
                kept.append(time.perf_counter() - start)
    return [float(np.median(kept) * 1000) for kept in times]


def _latencies_here(models: list[tuple[str, str]], size: int, repeats: int, litert: bool) -> list[dict]:
    """tf_b1_ms and tf_b32_ms (and litert_ms) of each (SavedModel, .tflite), timed in rounds in
    this process, under whatever threads TensorFlow was given."""
    import numpy as np
    import tensorflow as tf

    one = tf.constant(np.random.RandomState(0).rand(1, size, size, 3).astype(np.float32))
    many = tf.constant(np.random.RandomState(0).rand(32, size, size, 3).astype(np.float32))
    loaded, serves = [], []
    for saved_model, _ in models:
        loaded.append(tf.saved_model.load(saved_model))  # held: its variables live as long as it does
        serve = loaded[-1].signatures["serving_default"]
        serves.append((serve, list(serve.structured_input_signature[1])[0]))

    def tf_call(serve, name, x):
        return lambda: serve(**{name: x})

    b1 = _median_ms_in_rounds([tf_call(serve, name, one) for serve, name in serves], repeats)
    b32 = _median_ms_in_rounds([tf_call(serve, name, many) for serve, name in serves], max(5, repeats // 4))
    rows = [{"tf_b1_ms": a, "tf_b32_ms": b} for a, b in zip(b1, b32)]
    if litert:
        from ai_edge_litert.interpreter import Interpreter

        runners = []
        for _, tflite in models:
            runner = Interpreter(model_path=tflite, num_threads=1).get_signature_runner("serving_default")
            runners.append((runner, next(iter(runner.get_input_details()))))
        lite = _median_ms_in_rounds([(lambda r=runner, n=name: r(**{n: one.numpy()})) for runner, name in runners],
                                    repeats)
        for row, ms in zip(rows, lite):
            row["litert_ms"] = ms
    return rows


def _latencies(models: list[tuple[str, str]], size: int, repeats: int, threads: list[str],
               litert: bool = True, processes: int = 1) -> list[dict]:
    """The latencies of each (SavedModel, .tflite), each thread setting timed in a fresh process
    (TensorFlow takes its thread counts once, before it runs anything): "default" gives tf_b1_ms,
    tf_b32_ms and (with ``litert``) litert_ms; N gives tfN_b1_ms and tfN_b32_ms (N intra- and
    inter-op threads). With ``processes`` > 1 every setting is timed in that many fresh processes,
    one after the other: each key is the median over them, and KEY_runs lists each process's
    value in order (the models of one process were timed in the same rounds, so
    ``spread`` divides them process by process)."""
    import subprocess

    import numpy as np

    runs = [{} for _ in models]
    for _ in range(processes):
        for setting in threads:
            command = [sys.executable, os.path.abspath(__file__), "--time=" + json.dumps(models), f"--size={size}",
                       f"--repeats={repeats}", f"--threads={setting}",
                       f"--litert={int(litert and setting == 'default')}"]
            found = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            prefix = "tf" if setting == "default" else f"tf{setting}"
            for row, timed in zip(runs, json.loads(found)):
                for key, ms in timed.items():
                    row.setdefault(prefix + key[2:] if key.startswith("tf_") else key, []).append(ms)
    rows = [{key: float(np.median(values)) for key, values in row.items()} for row in runs]
    if processes > 1:
        for row, timed in zip(rows, runs):
            row.update({key + "_runs": values for key, values in timed.items()})
    return rows


def _dense_rows(rows) -> dict:
    """(model, variant) -> the row of its dense model, which every row of that kind is divided by."""
    return {(row["model"], row.get("variant", "export")): row for row in rows if row["ratio"] == 0.0}


def spread(rows) -> str:
    """For rows timed in several processes: each shrunk model's latency over its dense model's of
    the same variant, process by process (both timed in the same rounds of one process): the
    median, the lowest and the highest of those ratios, and how many processes there were."""
    import numpy as np

    dense = _dense_rows(rows)
    lines = []
    for row in rows:
        if row["ratio"] == 0.0:
            continue
        base = dense[(row["model"], row.get("variant", "export"))]
        cells = []
        for key in sorted(key for key in row if key.endswith("_ms_runs") and key in base):
            ratios = np.array(row[key]) / np.array(base[key])
            cells.append(f"{key[:-8]} {np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f}, "
                         f"{len(ratios)} processes)")
        if cells:
            lines.append(f"{row['model']} {row['ratio']:.0%} {VARIANTS[row.get('variant', 'export')]}: "
                         + "; ".join(cells))
    return "\n".join(lines)


def _machine() -> dict:
    """What the timings were taken on: the CPU's name and flags that matter to the kernels, the cores,
    TensorFlow's version (hosts of one machine kind differ from session to session)."""
    import tensorflow as tf

    first = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = f"{first.get('model name', '')} (family {first.get('cpu family', '?')}, model {first.get('model', '?')})"
    flags = {flag for flag in first.get("flags", "").split() if flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile")}
    return {"cpu": cpu, "flags": sorted(flags), "cores": os.cpu_count(), "tensorflow": tf.__version__}


def _model(name: str, size: int):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    x = np.random.RandomState(0).rand(8, size, size, 3).astype(np.float32) * 255
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x, training=True)
    return model, x


def measure(name: str, ratios, size: int, repeats: int, scratch: str, round_to: int = 8,
            threads=("default", "1"), variants=None, processes: int = 1) -> list[dict]:
    """The rows of one model: its dense export and each ratio, in each of ``variants`` (FINALIZE's
    keys; all by default), each variant's latencies timed in ``processes`` fresh processes."""
    import numpy as np
    import tensorflow as tf

    import graphprune

    variants = list(FINALIZE) if variants is None else [v for v in FINALIZE if v in variants]
    model, x = _model(name, size)
    dense = os.path.join(scratch, f"{name}_dense")
    model.export(dense, verbose=False)
    del model
    graphprune.export_tflite(dense, dense + ".tflite", overwrite=True)
    base = graphprune.cost(dense)
    rows = [{"model": name, "ratio": 0.0, "variant": "export", "parameters": base.parameters, "flops": base.flops,
             "non_trainable": base.non_trainable, "max_diff": 0.0}]
    paths = {}
    for variant, options in FINALIZE.items():  # the dense side: the Keras export, or it finalized
        path = dense
        if variant in FINALIZED_DENSE and variant in variants:
            path = graphprune.finalize(graphprune.prune(dense), f"{dense}_{variant}", overwrite=True, **options)
        paths[variant] = [(path, dense + ".tflite")]
    rows += [{**rows[0], "variant": variant} for variant in list(FINALIZE)[1:]]
    for ratio in ratios:
        start = time.perf_counter()
        pm = graphprune.prune(dense, graphprune.ConstantSparsity(ratio, 0), structure="channel", one_shot=True,
                              round_to=round_to)
        masked = pm.serve(x[:4]).numpy()
        out = os.path.join(scratch, f"{name}_{ratio}")
        for variant, options in FINALIZE.items():  # "export" first: prune + its finalize are timed
            path = out if not options else f"{out}_{variant}"  # "final" times the same model as "export"
            if variant in ("export", "unfolded") or (options and variant in variants):  # "unfolded": counted
                graphprune.finalize(pm, path, shrink=True, overwrite=True, **options)
            if variant == "export":
                seconds = time.perf_counter() - start
            paths[variant].append((path, out + ".tflite"))
        del pm
        loaded = tf.saved_model.load(out)  # held: its variables live as long as it does
        shrunk = loaded.serve(x[:4]).numpy()
        del loaded
        graphprune.export_tflite(out, out + ".tflite", overwrite=True)
        # counted with the batch norms not folded, as the Keras export is: folded, each normalized
        # channel's four values become one bias, which would flatter the ratio
        cost = graphprune.cost(f"{out}_unfolded")
        rows.append({"model": name, "ratio": ratio, "variant": "export", "parameters": cost.parameters,
                     "flops": cost.flops, "non_trainable": cost.non_trainable,
                     "max_diff": float(np.max(np.abs(shrunk - masked)) / np.max(np.abs(masked))),
                     "prune_finalize_s": seconds})
        rows += [{**rows[-1], "variant": variant} for variant in list(FINALIZE)[1:]]
    litert = {}  # every variant converts the same .tflite files: LiteRT is timed with the first variant only
    counted = {}  # SavedModel -> parameters: variants share the Keras export and finalize's default output
    rows = [row for row in rows if row["variant"] in variants]
    for variant, models in paths.items():
        if variant not in variants:
            continue
        mine = [row for row in rows if row["variant"] == variant]
        for row, (path, _) in zip(mine, models):  # what the timed SavedModel holds (batch norms folded or not)
            if path not in counted:
                counted[path] = graphprune.cost(path).parameters
            row["timed_parameters"] = counted[path]
        timed = _latencies(models, size, repeats, list(threads), litert=variant == variants[0], processes=processes)
        for row, latencies in zip(mine, timed):
            row.update(latencies)
            row["litert_ms"] = litert.setdefault(row["ratio"], row.get("litert_ms"))
            print(json.dumps(row), flush=True)
    return rows


# each variant's finalize options, for the shrunk model and, in FINALIZED_DENSE, the dense one too
# (the other variants' dense models are the Keras export itself)
FINALIZE = {"export": {}, "export_conv": {"pointwise_matmul": False}, "unfolded": {"fold_batch_norms": False},
            "final": {}, "frozen": {"freeze": "all"}, "frozen_conv": {"freeze": "all", "pointwise_matmul": False}}
FINALIZED_DENSE = {"final", "frozen", "frozen_conv"}
VARIANTS = {"export": "as exported / finalized", "export_conv": "as exported / finalized, 1x1 as convs",
            "unfolded": "as exported / finalized, batch norms not folded",
            "final": "finalized, both", "frozen": "freeze='all', both",
            "frozen_conv": "freeze='all', 1x1 as convs, both",
            # earlier runs' results files
            "export_mm": "as exported / finalized, every 1x1 as MatMul",
            "frozen_mm": "freeze='all', every 1x1 as MatMul, both"}


def table(rows) -> str:
    """Each row against the dense model of its own kind: the Keras export against finalize's
    default output, or both finalized with freeze='all' (normalization folded into constants)."""
    one_thread = all("tf1_b1_ms" in row for row in rows)
    lines = ["| model | channels removed | SavedModel | parameters | FLOPs (batch 1) | TF batch 1 | TF batch 32 | "
             + ("TF 1 thread, batch 1 | TF 1 thread, batch 32 | " if one_thread else "")
             + "LiteRT 1 thread | max diff / scale |", "|---|---|---|---|---|---|---|---|---|" + "---|---|" * one_thread]
    dense = _dense_rows(rows)
    for row in rows:
        base = dense[(row["model"], row.get("variant", "export"))]

        def cell(key, unit, digits=1):
            ratio = "" if row["ratio"] == 0.0 else f" ({row[key] / base[key]:.2f}x)"
            return f"{row[key]:.{digits}f} {unit}{ratio}"

        parameters = f"{row['parameters'] / 1e6:.2f}M"
        if row["ratio"] != 0.0:
            parameters += f" ({row['parameters'] / base['parameters']:.3f}x"
            if "non_trainable" in row:
                trainable = (row["parameters"] - row["non_trainable"]) / (base["parameters"] - base["non_trainable"])
                parameters += f"; trainable {trainable:.3f}x"
            if "timed_parameters" in row and row["timed_parameters"] != row["parameters"]:
                parameters += f"; as timed {row['timed_parameters'] / base['timed_parameters']:.3f}x"
            parameters += ")"
        flops = f"{row['flops'] / 1e9:.3f} G" + ("" if row["ratio"] == 0.0 else f" ({row['flops'] / base['flops']:.2f}x)")
        lines.append(f"| {row['model']} | {row['ratio']:.0%} | {VARIANTS[row.get('variant', 'export')]} | {parameters} | {flops} | {cell('tf_b1_ms', 'ms')} | "
                     f"{cell('tf_b32_ms', 'ms', 0)} | "
                     + (f"{cell('tf1_b1_ms', 'ms')} | {cell('tf1_b32_ms', 'ms', 0)} | " if one_thread else "")
                     + f"{cell('litert_ms', 'ms')} | {row['max_diff']:.1e} |")
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({row["model"] for row in rows}):
        mine = sorted((row for row in rows if row["model"] == model and row.get("variant", "export") == "export"),
                      key=lambda row: row["ratio"])
        base = mine[0]
        ratios = [row["ratio"] for row in mine]
        axes[0].plot(ratios, [row["parameters"] / base["parameters"] for row in mine], "o-", label=f"{model} params")
        axes[0].plot(ratios, [row["flops"] / base["flops"] for row in mine], "s--", label=f"{model} FLOPs")
        for key, style in (("tf_b1_ms", "o-"), ("tf_b32_ms", "s--"), ("tf1_b1_ms", "v-."), ("litert_ms", "^:")):
            if all(key in row for row in mine):
                axes[1].plot(ratios, [row[key] / base[key] for row in mine], style, label=f"{model} {key[:-3]}")
    axes[0].set(xlabel="channels removed per group", ylabel="x dense", title="size")
    axes[1].set(xlabel="channels removed per group", ylabel="x dense latency", title="latency (this machine)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv) -> None:
    options = dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], "1") for arg in argv if arg.startswith("--"))
    if "time" in options:  # a child of _latencies: time these models under these threads, print one JSON line
        setting = options.get("threads", "default")
        if setting != "default":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(int(setting))
            tf.config.threading.set_inter_op_parallelism_threads(int(setting))
        models = [tuple(pair) for pair in json.loads(options["time"])]
        print(json.dumps(_latencies_here(models, int(options.get("size", 128)), int(options.get("repeats", 50)),
                                         litert=options.get("litert") == "1")))
        return
    if "plot" in options:
        with open(RESULTS) as handle:
            rows = json.load(handle)["rows"]
        plot(rows, os.path.join(HERE, "channels.png"))
        print(table(rows))
        return
    models = options.get("models", "ResNet50,MobileNetV2").split(",")
    ratios = [float(r) for r in options.get("ratios", "0.25,0.5,0.75").split(",")]
    size, repeats = int(options.get("size", 128)), int(options.get("repeats", 50))
    round_to = int(options.get("round_to", 8))
    threads = options.get("threads", "default,1").split(",")
    variants = options["variants"].split(",") if "variants" in options else list(FINALIZE)
    unknown = sorted(set(variants) - set(FINALIZE))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose among {', '.join(FINALIZE)}")
    processes = int(options.get("processes", 1))
    if processes < 1:
        raise SystemExit(f"--processes must be 1 or more, got {processes}")
    results = RESULTS if round_to == 8 else RESULTS.replace(".json", f"_round_to_{round_to}.json")
    if options.get("onednn") == "0":  # TensorFlow's Eigen kernels instead of oneDNN's (set before it loads)
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
        results = results.replace(".json", "_onednn_off.json")
    if "results" in options:  # e.g. --ratios=0.5 --results=channels_repeat_50.json: a second run beside the first
        results = os.path.join(os.path.dirname(RESULTS), os.path.basename(options["results"]))
    scratch = tempfile.mkdtemp(prefix="gp-channels-")
    rows = []
    try:
        for name in models:
            rows += measure(name, ratios, size, repeats, scratch, round_to, threads, variants, processes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as handle:
        json.dump({"size": size, "repeats": repeats, "round_to": round_to, "threads": threads, "variants": variants,
                   "processes": processes, "machine": _machine(), "rows": rows}, handle, indent=1)
    if results == RESULTS:
        plot(rows, os.path.join(HERE, "channels.png"))
    print(table(rows))
    if processes > 1:
        print(spread(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
