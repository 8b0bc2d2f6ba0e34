"""The model zoo of the real-model tests, measured: weights found against kernels counted, each
stage's largest difference (relative to the output scale) and time, written to benchmarks/zoo.md.

    python benchmarks/zoo.py [--only=bert,ConvNeXtTiny]

Models are built from their configs with random weights and small inputs, exactly as the tests
build them (tests/test_zoo_applications.py, tests/test_real_models.py); nothing is downloaded.
Stages: prune (rewrite), all-ones equivalence, one-shot 50%, a GradientTape step, save + reload,
finalize, TFLite conversion + LiteRT (or the converter's refusal, in one line).
"""

import os
import sys
import tempfile
import time
import warnings

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import graphprune  # noqa: E402

_ONLY = flags.DEFINE_list("only", [], "Run only these models (names as in the table).")

APPLICATIONS = [("MobileNetV2", 32), ("ResNet50", 32), ("EfficientNetB0", 32), ("Xception", 71),
                ("EfficientNetV2B0", 32), ("DenseNet121", 32), ("MobileNetV3Small", 32), ("InceptionV3", 75),
                ("NASNetMobile", 32), ("ConvNeXtTiny", 32), ("VGG16", 32), ("MobileNet", 32), ("ResNet50V2", 32)]
HUB_TEXT = ["bert", "gpt2", "gemma", "llama", "t5", "whisper", "distilbert", "roberta", "mistral", "qwen", "opt",
            "gpt_neox"]
HUB_VISION = ["vit", "resnet", "vgg", "densenet", "efficientnet"]


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def _flat(outputs):
    return np.concatenate([np.asarray(t).reshape(-1) for t in tf.nest.flatten(outputs)])


def _case(name):
    """(model, export call on the loaded SavedModel (x -> outputs), x, kernels counted)."""
    import keras

    if name in dict(APPLICATIONS):
        from test_zoo_applications import _calibrated

        model, x = _calibrated(name, dict(APPLICATIONS)[name])
        return model, (lambda m, v: m.serve(v)), x, "keras.applications"
    if name in HUB_VISION:
        from test_real_models import _hub_vision_backbones

        model = _hub_vision_backbones()[name]()
        x = np.random.RandomState(0).uniform(size=[3, 32, 32, 3]).astype(np.float32)
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        model(x, training=True)
        return model, (lambda m, v: m.serve(v)), x, "keras-hub"
    from test_real_models import _hub_backbones, _inputs

    model = _hub_backbones()[name]()
    return model, (lambda m, v: m.signatures["serving_default"](**v)), None, "keras-hub"


def measure(name, root):
    model, call, x, library = _case(name)
    path = os.path.join(root, name)
    model.export(os.path.join(path, "export"), verbose=False)
    counted = len([w for w in model.weights if w.path.endswith("kernel") and len(w.shape) >= 2])
    original = tf.saved_model.load(os.path.join(path, "export"))
    if x is None:
        from test_real_models import _inputs

        x = _inputs(original.signatures["serving_default"].structured_input_signature[1], np.random.RandomState(0))
    reference = _flat(call(original, x))
    scale = float(np.abs(reference).max())
    row = {"model": name, "library": library, "parameters": int(model.count_params()), "counted": counted,
           "scale": scale}
    pm, row["prune_s"] = _timed(lambda: graphprune.prune(os.path.join(path, "export"),
                                                         schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1)))
    row["found"] = len(pm.weights())
    row["ones_diff"] = float(np.abs(_flat(call(pm, x)) - reference).max()) / scale
    _, row["one_shot_s"] = _timed(pm.prune_now)
    row["sparsity_min"] = min(r["sparsity"] for r in pm.weights())
    masked = _flat(call(pm, x))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum([tf.reduce_sum(tf.square(t)) for t in tf.nest.flatten(call(pm, x))])
    gradients, row["gradient_s"] = _timed(lambda: tape.gradient(loss, pm.trainable_variables))
    row["gradients_none"] = sum(g is None for g in gradients)
    _, row["save_s"] = _timed(lambda: graphprune.save(pm, os.path.join(path, "prunable")))
    reloaded = tf.saved_model.load(os.path.join(path, "prunable"))
    row["reload_diff"] = float(np.abs(_flat(call(reloaded, x)) - masked).max()) / scale
    final_dir, row["finalize_s"] = _timed(lambda: graphprune.finalize(pm, os.path.join(path, "final")))
    final = tf.saved_model.load(final_dir)
    row["final_diff"] = float(np.abs(_flat(call(final, x)) - masked).max()) / scale
    started = time.perf_counter()
    try:
        tflite = graphprune.export_tflite(final_dir, os.path.join(path, "m.tflite"))
        row["tflite"] = _litert_diff(tflite, x, masked) / scale
    except graphprune.GraphPruneError as error:
        row["tflite"] = str(error).splitlines()[0][:120]
    row["tflite_s"] = time.perf_counter() - started
    return row


def _litert_diff(path, x, masked):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    inputs = x if isinstance(x, dict) else {next(iter(runner.get_input_details())): x}
    if isinstance(x, dict):
        inputs = {k: np.asarray(v) for k, v in x.items()}
    outputs = runner(**inputs)
    got = np.concatenate([np.asarray(outputs[k]).reshape(-1) for k in sorted(outputs)])
    if got.size != masked.size:
        return float("nan")
    return float(np.abs(np.sort(got) - np.sort(masked)).max())  # output order may differ: compare as sets


def _cell(value):
    if isinstance(value, str):
        return f"refused: {value}"
    return f"{value:.1e}"


def write_table(rows, path):
    lines = [
        "# The model zoo, measured",
        "",
        "`python benchmarks/zoo.py` (one run, 2 cores, TF " + tf.__version__ + "). Random weights, small inputs, "
        "built from configs as in the tests; differences are the largest absolute difference divided by the "
        "largest output magnitude; one-shot is 50% on every found weight. The tests assert the same chain "
        "(tests/test_zoo_applications.py, tests/test_real_models.py).",
        "",
        "| model | library | params | found / counted | all-ones | min sparsity | grads None | reload | finalize | "
        "TFLite + LiteRT | prune s | finalize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | error: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['library']} | {r['parameters']:,} | {r['found']} / {r['counted']} | "
                     f"{_cell(r['ones_diff'])} | {r['sparsity_min']:.3f} | {r['gradients_none']} | "
                     f"{_cell(r['reload_diff'])} | {_cell(r['final_diff'])} | {_cell(r['tflite'])} | "
                     f"{r['prune_s']:.1f} | {r['finalize_s']:.1f} |")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv):
    del argv
    warnings.simplefilter("ignore")
    names = [n for n, _ in APPLICATIONS] + HUB_VISION + HUB_TEXT
    if _ONLY.value:
        names = [n for n in names if n in _ONLY.value]
    root = tempfile.mkdtemp()
    rows = []
    for name in names:
        try:
            row = measure(name, root)
        except Exception as error:  # a model that breaks is a row, not the end of the table
            row = {"model": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"}
        print({k: (round(v, 8) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo.md")
    write_table(rows, out)
    print(f"wrote {out} and {bc.write_json('zoo', {'machine': bc.machine(), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
