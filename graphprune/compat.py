"""Every private TensorFlow API graphprune relies on, in one guarded place.

Each helper is pinned by ``tests/test_compat.py``; when a TensorFlow release moves one, the
helper raises UnsupportedError naming the TensorFlow version and the API, instead of failing
somewhere deep (or, worse, silently building a model without gradients).

    inline_functions        Grappler's function inliner (convert_to_constants' first step)
    register_function_def   the eager context's function registry (If/While bodies at run time)
    trackable_children      a trackable object's named children (SavedModel's object graph)
    traced_concrete_functions  every concrete trace of a tf.function
    capture / watch_variable   FuncGraph capture of an outside tensor, GradientTape visibility
    op_def                  the registered OpDef of an op type (output argument names)
    tflite_schema           the flatbuffer schema module of the TFLite converter
"""

from __future__ import annotations

import tensorflow as tf

from graphprune.errors import UnsupportedError

# TensorFlow versions these helpers are known to work with (tests/test_compat.py checks them).
TESTED_VERSIONS = "2.16 to 2.21"


def _moved(api: str, error: Exception) -> UnsupportedError:
    return UnsupportedError(
        f"this TensorFlow ({tf.__version__}) lacks {api}, which graphprune uses (tested with TensorFlow "
        f"{TESTED_VERSIONS}): install a tested version ({type(error).__name__}: {error})")


def inline_functions(concrete_function):
    """A flat GraphDef of ``concrete_function``: calls inlined, While/If kept functional."""
    try:
        from tensorflow.python.framework import convert_to_constants  # pylint: disable=import-outside-toplevel

        inline = convert_to_constants._run_inline_graph_optimization  # pylint: disable=protected-access
    except (ImportError, AttributeError) as error:  # pragma: no cover - only on a TF without it
        raise _moved("convert_to_constants._run_inline_graph_optimization", error) from error
    return inline(concrete_function, lower_control_flow=False, aggressive_inlining=True)


def register_function_def(function_def) -> None:
    """Make a FunctionDef callable by name in the eager context (idempotent)."""
    try:
        from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel

        ctx = context.context()
        if not ctx.has_function(function_def.signature.name):
            ctx.add_function_def(function_def)
    except (ImportError, AttributeError) as error:  # pragma: no cover
        raise _moved("context.add_function_def", error) from error


def trackable_children(obj) -> dict:
    """Named children of a trackable object (attributes SavedModel tracks); {} for anything else."""
    method = getattr(obj, "_trackable_children", None)
    if method is None:
        return {}
    try:
        return dict(method())
    except TypeError:
        return {}


def is_trackable(obj) -> bool:
    return hasattr(obj, "_trackable_children")


def traced_concrete_functions(function) -> list:
    """Every concrete trace a tf.function (or a restored one) has."""
    method = getattr(function, "_list_all_concrete_functions", None)
    if method is not None:
        return list(method())
    return list(getattr(function, "concrete_functions", []))


def capture(graph, tensor, name: str | None = None):
    """``tensor`` as seen inside ``graph``: captured into a FuncGraph, as is in a plain graph."""
    if not _is_func_graph(graph):
        return tensor
    method = getattr(graph, "capture", None)
    if method is None:  # pragma: no cover
        raise _moved("FuncGraph.capture", AttributeError("capture"))
    return method(tensor, name=name) if name is not None else method(tensor)


def watch_variable(graph, variable) -> None:
    """Let a GradientTape around the function see ``variable``: without it gradients are None."""
    if not _is_func_graph(graph):
        return
    method = getattr(graph, "watch_variable", None)
    if method is None:  # pragma: no cover
        raise _moved("FuncGraph.watch_variable", AttributeError("watch_variable"))
    method(variable)


def _is_func_graph(graph) -> bool:
    try:
        from tensorflow.python.framework import func_graph  # pylint: disable=import-outside-toplevel
    except ImportError as error:  # pragma: no cover
        raise _moved("func_graph.FuncGraph", error) from error
    return isinstance(graph, func_graph.FuncGraph)


_OP_DEFS: dict = {}


def op_def(op_type: str):
    """The registered OpDef of ``op_type``, or None (a library function called as an op)."""
    if op_type not in _OP_DEFS:
        try:
            from tensorflow.python.framework import op_def_registry  # pylint: disable=import-outside-toplevel
        except ImportError as error:  # pragma: no cover
            raise _moved("op_def_registry", error) from error
        _OP_DEFS[op_type] = op_def_registry.get(op_type)
    return _OP_DEFS[op_type]


def tflite_schema():
    """The TFLite flatbuffer schema (generated Python classes)."""
    try:
        from tensorflow.lite.python import schema_py_generated  # pylint: disable=import-outside-toplevel
    except ImportError as error:  # pragma: no cover
        raise _moved("tensorflow.lite.python.schema_py_generated", error) from error
    return schema_py_generated
