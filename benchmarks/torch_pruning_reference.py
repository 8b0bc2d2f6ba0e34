"""Torch-Pruning on the same two models, for the channel-pruning comparison (issue #17's bar).

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision torch-pruning
    /tmp/tv/bin/python benchmarks/torch_pruning_reference.py [--ratios=0.25,0.5,0.75 --size=128 --repeats=30]

Not a graphprune dependency: it runs in its own environment (PyTorch). torchvision's ResNet50 and
MobileNetV2 (random weights, 1000 classes, eval mode), pruned by Torch-Pruning's MetaPruner with
L2 group magnitude importance at each ratio of channels per group, in two ways:

    head kept     the classifier in ignored_layers (its 1000 outputs stay), as graphprune keeps
                  an entry's outputs: the same problem graphprune solves
    head pruned   no layer ignored: the classifier's outputs are pruned too, which changes what
                  the model computes (fewer classes)

and for each, with the dense model: parameters and MACs (tp.utils.count_ops_and_params, 128x128)
and the median latency of batch 1 on 1 thread (torch.set_num_threads(1)), eval mode, no grad.
Results: benchmarks/results/torch_pruning_reference.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "torch_pruning_reference.json")


def _median_ms(run, repeats: int) -> float:
    import statistics

    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(name: str, ratios, size: int, repeats: int) -> list[dict]:
    import torch
    import torch_pruning as tp
    import torchvision

    torch.manual_seed(0)
    example = torch.randn(1, 3, size, size)
    rows = []

    def row(model, ratio, head):
        model.eval()
        macs, params = tp.utils.count_ops_and_params(model, example)
        with torch.no_grad():
            latency = _median_ms(lambda: model(example), repeats)
        rows.append({"model": name, "ratio": ratio, "head": head, "parameters": int(params), "macs": int(macs),
                     "torch_b1_ms": latency})
        print(json.dumps(rows[-1]), flush=True)

    row(getattr(torchvision.models, name.lower())(weights=None), 0.0, "dense")
    for ratio in ratios:
        for head in ("kept", "pruned"):
            model = getattr(torchvision.models, name.lower())(weights=None).eval()
            classifier = model.fc if hasattr(model, "fc") else model.classifier[-1]
            pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=ratio,
                                          ignored_layers=[classifier] if head == "kept" else [])
            pruner.step()
            row(model, ratio, head)
    return rows


def table(rows) -> str:
    lines = ["| model | channels removed | classifier outputs | parameters | MACs | PyTorch batch 1, 1 thread |",
             "|---|---|---|---|---|---|"]
    dense = {row["model"]: row for row in rows if row["ratio"] == 0.0}
    for row in rows:
        base = dense[row["model"]]

        def x(key):
            return "" if row["ratio"] == 0.0 else f" ({row[key] / base[key]:.2f}x)"

        head = {"dense": "1000", "kept": "1000 (ignored_layers)", "pruned": "pruned too"}[row["head"]]
        lines.append(f"| {row['model']} | {row['ratio']:.0%} | {head} | {row['parameters'] / 1e6:.2f}M{x('parameters')} | "
                     f"{row['macs'] / 1e9:.3f} G{x('macs')} | {row['torch_b1_ms']:.1f} ms{x('torch_b1_ms')} |")
    return "\n".join(lines)


def main(argv) -> None:
    import torch

    options = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    ratios = [float(r) for r in options.get("ratios", "0.25,0.5,0.75").split(",")]
    size, repeats = int(options.get("size", 128)), int(options.get("repeats", 30))
    torch.set_num_threads(1)
    rows = []
    for name in options.get("models", "ResNet50,MobileNet_V2").split(","):
        rows += measure(name, ratios, size, repeats)
    import torch_pruning

    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump({"size": size, "repeats": repeats, "threads": 1, "torch": torch.__version__,
                   "torch_pruning": getattr(torch_pruning, "__version__", "?"), "rows": rows}, handle, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
