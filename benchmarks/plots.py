"""Plots from the benchmark results (results/*.json) into benchmarks/*.png.

    python benchmarks/plots.py

accuracy_vs_sparsity.png and sparsity_ramp.png (from accuracy_vs_sparsity.py), artifact_sizes.png
(artifact_sizes.py), mask_update_time.png (mask_update_time.py), rewrite_time.png (rewrite_time.py).
A plot whose results are missing is skipped with a note.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bench_common as bc  # noqa: E402

LABELS = {"dense": "dense", "layer": "graphprune layer-wise", "global": "graphprune global",
          "reference": "reference (tfmot prune_low_magnitude)"}
STYLES = {"layer": "o-", "global": "s-", "reference": "^--", "dense": "k:"}


def _save(figure, name):
    path = os.path.join(bc.HERE, f"{name}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def accuracy_plots(result):
    runs = result["runs"]
    dense = next(r for r in runs if r["method"] == "dense")
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in ("layer", "global", "reference"):
        points = sorted((r["target"], r["accuracy"]) for r in runs if r["method"] == method)
        if points:
            points = [(0.0, dense["accuracy"])] + points
            axis.plot([100 * t for t, _ in points], [100 * a for _, a in points], STYLES[method], label=LABELS[method])
    axis.axhline(100 * dense["accuracy"], color="k", linestyle=":", label="dense (same fine-tuning)")
    config = result["config"]
    axis.set(xlabel="target sparsity (%)", ylabel="test accuracy (%)",
             title=f"Fashion-MNIST, MNIST CNN: {config['finetune_epochs']} fine-tuning epochs, batch "
                   f"{config['batch_size']}, {config['optimizer']}")
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, "accuracy_vs_sparsity")

    target = 0.9 if any(r["target"] == 0.9 for r in runs) else max(r["target"] for r in runs)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    end, steps = config["end_step"], config["finetune_steps"]
    frequency = int(config["schedule"].split("frequency ")[1].rstrip(")"))
    schedule = []
    for step in range(steps + 1):
        update = step if step >= end else step - step % frequency  # the target at the last update
        schedule.append(target * (1 - (1 - min(update, end) / end) ** 3))
    axis.plot(range(steps + 1), [100 * s for s in schedule], color="0.6", linewidth=3, alpha=0.6,
              label="schedule target (at updates)")
    for method in ("layer", "global", "reference"):
        run = next((r for r in runs if r["method"] == method and r["target"] == target), None)
        if run and run["ramp"]:
            axis.plot([s for s, _ in run["ramp"]], [100 * v for _, v in run["ramp"]], STYLES[method],
                      markersize=2.5, label=LABELS[method])
    axis.set(xlabel="training step", ylabel="sparsity of the pruned kernels (%)",
             title=f"Sparsity ramp to {target:.0%}: {config['schedule']}")
    axis.title.set_fontsize(8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, "sparsity_ramp")


def size_plot(result):
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    kinds = ["SavedModel", "TFLite float", "TFLite float, sparse encoding", "TFLite dynamic int8"]
    figure, axis = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / len(kinds)
    labelled = set()
    for k, kind in enumerate(kinds):
        for m, model in enumerate(models):
            row = next((r for r in rows if r["model"] == model and r["artifact"] == kind), None)
            if row is None:
                continue
            x = m + (k - (len(kinds) - 1) / 2) * width
            axis.bar(x, row["gzip_bytes"] / 1e6, width, color=f"C{k}", label=None if kind in labelled else kind)
            labelled.add(kind)
            axis.plot([x - width / 2, x + width / 2], [row["bound_bytes"] / 1e6] * 2, color="k", linewidth=1.5)
    axis.plot([], [], color="k", label="information bound (size_report)")
    axis.set_xticks(range(len(models)), models, fontsize=8)
    axis.set_yscale("log")
    axis.set(ylabel="gzip size (MB, log)", title=f"Artifacts at {result['target']}% sparsity (dense for reference)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, axis="y")
    _save(figure, "artifact_sizes")


def mask_update_plot(result):
    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    for scope, style in (("layer", "o-"), ("global", "s-")):
        axis.plot([r["parameters"] for r in rows], [r[f"{scope}_ms"] for r in rows], style, label=scope)
    axis.set(xscale="log", yscale="log", xlabel="parameters", ylabel="mask update (ms)",
             title="Mask recomputation time vs parameters (sparsity 0.9)")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    _save(figure, "mask_update_time")


def rewrite_plot(result):
    rows = sorted(result["rows"], key=lambda r: r["parameters"])
    figure, axis = plt.subplots(figsize=(6.0, 4.0))
    for key, style, label in (("baseline_s", "k:o", "tf.saved_model load + save"), ("prune_s", "o-", "prune"),
                              ("finalize_s", "s-", "finalize (frozen)")):
        axis.plot([r["parameters"] / 1e6 for r in rows], [r[key] for r in rows], style, label=label)
    for row in rows:
        axis.annotate(row["model"], (row["parameters"] / 1e6, row["baseline_s"]), fontsize=7)
    axis.set(xlabel="parameters (millions)", ylabel="seconds", title="Rewrite and finalize time vs model size")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, "rewrite_time")


def main():
    for name, plot in (("accuracy_vs_sparsity", accuracy_plots), ("artifact_sizes", size_plot),
                       ("mask_update_time", mask_update_plot), ("rewrite_time", rewrite_plot)):
        result = bc.read_json(name)
        if result is None:
            print(f"skipped {name}: results/{name}.json missing (run benchmarks/{name}.py)")
            continue
        plot(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
