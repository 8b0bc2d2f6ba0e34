"""Artifact sizes at 90%: dense / pruned / pruned + int8, raw and gzip, SavedModel and TFLite, for
graphprune (layer-wise and global) and the reference toolkit, next to the information-theoretic bound.

    python benchmarks/accuracy_vs_sparsity.py     # trains and keeps the models (results/models/)
    python benchmarks/artifact_sizes.py

Every model goes through the same converter (graphprune.export_tflite, i.e. tf.lite's
TFLiteConverter from the SavedModel), so the sizes differ only by what pruning left in the weights.
The bound is graphprune.size_report's: per pruned weight, nonzeros x value bits + elements x H(density),
with 32-bit values for float and 8-bit for int8. TFLite accuracy is on the Fashion-MNIST test set
(LiteRT interpreter). Results: results/artifact_sizes.json.
"""

import os
import sys

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402
from graphprune.report import directory_bytes, gzip_size, lower_bound_bytes  # noqa: E402

_MODELS_DIR = flags.DEFINE_string("models_dir", os.path.join(bc.RESULTS, "models"),
                                  "Where accuracy_vs_sparsity.py kept its models.")
_TARGET = flags.DEFINE_integer("target", 90, "Sparsity (percent) of the kept models.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST idx .gz files.")
_EVAL = flags.DEFINE_integer("eval_examples", 10000, "Test images for the TFLite accuracy.")


def _file_sizes(path):
    if os.path.isdir(path):
        return directory_bytes(path)
    with open(path, "rb") as handle:
        content = handle.read()
    return len(content), gzip_size(content)


def _tflite_accuracy(path, images, labels):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    name = next(iter(runner.get_input_details()))
    correct = sum(int(np.argmax(next(iter(runner(**{name: image[np.newaxis]}).values()))) == label)
                  for image, label in zip(images, labels))
    return correct / len(images)


def main(argv):
    del argv
    bc.quiet()
    data = bc.require_full_data(_DATA_DIR.value)
    images, labels = data["x_test"][:_EVAL.value], data["y_test"][:_EVAL.value]
    models = [("dense", "dense"), ("graphprune layer-wise", f"graphprune_layer_{_TARGET.value}"),
              ("graphprune global", f"graphprune_global_{_TARGET.value}"), ("reference", f"reference_{_TARGET.value}")]
    missing = [d for _, d in models if not os.path.isdir(os.path.join(_MODELS_DIR.value, d))]
    if missing:
        raise SystemExit(f"{_MODELS_DIR.value} lacks {', '.join(missing)}: run benchmarks/accuracy_vs_sparsity.py first")
    out = os.path.join(bc.RESULTS, "tflite")
    rows = []
    representative = data["x_train"][:200]
    for label, directory in models:
        saved = os.path.join(_MODELS_DIR.value, directory)
        artifacts = [("SavedModel", saved, None)]
        for kind, quantize, sparse in (("TFLite float", None, False), ("TFLite dynamic int8", "dynamic", False),
                                       ("TFLite float, sparse encoding", None, True)):
            if sparse and label == "dense":
                continue
            path = os.path.join(out, f"{directory}_{kind.split()[1].rstrip(',')}{'_sparse' if sparse else ''}.tflite")
            graphprune.export_tflite(saved, path, quantize=quantize, sparse=sparse, overwrite=True,
                                     representative_data=representative)
            artifacts.append((kind, path, quantize))
        report = graphprune.size_report(artifacts[1][1])  # the float TFLite: its kernels and their zeros
        bound32 = report.bound_bytes
        bound8 = sum(lower_bound_bytes(w.elements, w.nonzeros, 8) for w in report.weights)
        for kind, path, quantize in artifacts:
            raw, zipped = _file_sizes(path)
            accuracy = _tflite_accuracy(path, images, labels) if path.endswith(".tflite") else None
            bound = bound8 if quantize else bound32
            rows.append({"model": label, "artifact": kind, "raw_bytes": raw, "gzip_bytes": zipped,
                         "bound_bytes": bound, "gzip_over_bound": zipped / bound, "accuracy": accuracy,
                         "sparsity": report.sparsity})
            shown = f"{accuracy:.4f}" if accuracy is not None else "-"
            print(f"| {label} | {kind} | {raw:,} | {zipped:,} | {bound:,.0f} | {zipped / bound:.2f} | "
                  f"{report.sparsity:.3f} | {shown} |", flush=True)
    path = bc.write_json("artifact_sizes", {"machine": bc.machine(), "target": _TARGET.value, "rows": rows,
                                            "eval_examples": len(images)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
