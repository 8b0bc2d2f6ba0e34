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

import importlib

# Public name -> module. Loaded on first use (PEP 562), so `import graphprune` and the command
# line start without importing TensorFlow until a command needs it.
_EXPORTS = {
    "prune": "graphprune.api",
    "save": "graphprune.api",
    "PruningCallback": "graphprune.callbacks",
    "PruningConfig": "graphprune.config",
    "channel_groups": "graphprune.channels",
    "cost": "graphprune.channels",
    "Rule": "graphprune.config",
    "Structure": "graphprune.config",
    "BadModelError": "graphprune.errors",
    "GraphPruneError": "graphprune.errors",
    "NoPrunableWeightsError": "graphprune.errors",
    "OutputExistsError": "graphprune.errors",
    "PassError": "graphprune.errors",
    "ScheduleError": "graphprune.errors",
    "StructureError": "graphprune.errors",
    "UnsupportedError": "graphprune.errors",
    "export_tflite": "graphprune.finalization",
    "finalize": "graphprune.finalization",
    "magnitude_mask": "graphprune.masks",
    "PrunableModel": "graphprune.model",
    "SizeReport": "graphprune.report",
    "size_report": "graphprune.report",
    "ConstantSparsity": "graphprune.schedules",
    "PolynomialDecay": "graphprune.schedules",
    "PruningSchedule": "graphprune.schedules",
}
_SUBMODULES = ("io", "report", "pipeline", "graph", "load", "masks", "schedules", "config", "verify", "channels")

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    try:
        if name in _EXPORTS:
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
        elif name in _SUBMODULES:
            value = importlib.import_module(f"graphprune.{name}")
        else:
            raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
    except ModuleNotFoundError as error:
        if error.name != "tensorflow" and not (error.name or "").startswith("tensorflow."):
            raise
        from graphprune.errors import NO_TENSORFLOW, MissingTensorFlowError

        raise MissingTensorFlowError(NO_TENSORFLOW) from error
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
