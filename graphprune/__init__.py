"""graphprune: magnitude pruning for TensorFlow graphs.

    import graphprune
    pm = graphprune.prune("saved_model_dir", schedule=graphprune.PolynomialDecay(0.0, 0.9, 0, 1000))
    for x, y in data:                       # your own training loop
        pm.update_masks()
        with tf.GradientTape() as tape:
            loss = loss_fn(y, pm(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, pm.trainable_variables), pm.trainable_variables))
    graphprune.save(pm, "pruned_dir")
"""

from graphprune import io
from graphprune.api import prune, save
from graphprune.callbacks import PruningCallback
from graphprune.config import PruningConfig, Rule, Structure
from graphprune.errors import (
    BadModelError,
    GraphPruneError,
    NoPrunableWeightsError,
    OutputExistsError,
    PassError,
    ScheduleError,
    StructureError,
    UnsupportedError,
)
from graphprune.finalize import export_tflite, finalize
from graphprune.masks import magnitude_mask
from graphprune.model import PrunableModel
from graphprune.report import SizeReport, size_report
from graphprune.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule

__all__ = [
    "BadModelError",
    "ConstantSparsity",
    "GraphPruneError",
    "NoPrunableWeightsError",
    "OutputExistsError",
    "PassError",
    "PolynomialDecay",
    "PrunableModel",
    "PruningCallback",
    "PruningConfig",
    "PruningSchedule",
    "Rule",
    "ScheduleError",
    "Structure",
    "StructureError",
    "UnsupportedError",
    "export_tflite",
    "finalize",
    "magnitude_mask",
    "prune",
    "save",
    "size_report",
    "SizeReport",
]
__version__ = "0.1.0"
