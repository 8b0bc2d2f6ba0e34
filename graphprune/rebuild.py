"""Edge: turn a TracedModel's entries back into tf.functions bound to real variables.

Inside a tf.function, each entry's GraphDef is imported with its input placeholders mapped to the
call's tensors and each resource placeholder mapped to its variable's captured handle. The
variable is also watched, so a GradientTape around the call sees it (DESIGN.md).
"""

from __future__ import annotations

import functools
import inspect
import keyword
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from graphprune import graph as g
from graphprune.errors import BadModelError


def create_variables(model: g.TracedModel, variables: Mapping[str, tf.Variable]) -> dict[str, tf.Variable]:
    """The live variables for every spec: the given ones, plus new ones for specs with an initial
    value (created under the current tf.distribute strategy scope, if any)."""
    live = dict(variables)
    for key, spec in model.variables.items():
        if key in live:
            continue
        if spec.initial is None:
            raise BadModelError(f"variable '{key}' is read by the graph but was not given; pass the model it came from")
        live[key] = tf.Variable(
            np.asarray(spec.initial),
            name=key,
            dtype=spec.dtype,
            trainable=spec.trainable,
            # Masks, thresholds and the step are written only by the cross-replica update.
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    return live


def captured_tensor(obj):
    """See load.captured_tensor (the same rule, here to keep rebuild free of load)."""
    if isinstance(obj, tf.saved_model.Asset):
        return obj.asset_path
    return obj.resource_handle


def is_distributed(variable) -> bool:
    """A tf.distribute variable (MirroredVariable, ...): it has per-replica ``values``."""
    return isinstance(getattr(variable, "values", None), (tuple, list)) and not isinstance(variable, tf.Tensor)


def _replica_components(variable) -> tuple:
    """The per-replica variables behind a distributed variable, or (variable,)."""
    return tuple(variable.values) if is_distributed(variable) else (variable,)


def register_library(graph_def) -> None:
    """Make the GraphDef's library functions (If/While bodies) callable at run time.

    import_graph_def adds them to the graph only as legacy _DefinedFunctions; the eager runtime
    resolves them by name in the context, where nothing keeps them once the graph they were built
    in is gone. Registering an identical FunctionDef twice is harmless.
    """
    from tensorflow.python.eager import context  # pylint: disable=import-outside-toplevel

    ctx = context.context()
    for function_def in graph_def.library.function:
        if not ctx.has_function(function_def.signature.name):
            ctx.add_function_def(function_def)


def import_entry(entry: g.Entry, flat_inputs, variables: Mapping[str, tf.Variable], *, replica: int | None = None,
                 scope: str = "graphprune"):
    """Import ``entry`` into the current (function) graph; returns its flat outputs."""
    graph = tf.compat.v1.get_default_graph()
    input_map = {}
    for info, value in zip(entry.inputs, flat_inputs):
        input_map[info.placeholder] = tf.convert_to_tensor(value, dtype=info.dtype)
    cross_replica = tf.distribute.in_cross_replica_context()
    for placeholder, key in entry.resources.items():
        variable = variables[key]
        components = _replica_components(variable)
        if replica is not None:
            variable = components[replica]
        elif cross_replica and is_distributed(variables[key]):
            variable = components[0]  # outside strategy.run a distributed variable has no handle
        input_map[placeholder] = graph.capture(variable.handle) if hasattr(graph, "capture") else variable.handle
        if hasattr(graph, "watch_variable"):
            graph.watch_variable(variable)
    present = None
    for placeholder, obj in entry.captured_resources.items():
        present = present if present is not None else {node.name for node in entry.graph_def.node}
        if placeholder in present:  # a pass may have stripped a capture nothing reads any more
            tensor = captured_tensor(obj)
            input_map[placeholder] = graph.capture(tensor) if hasattr(graph, "capture") else tensor
    graph_def, constants = _split_large_constants(entry)
    for name, value in constants.items():
        input_map[f"{name}:0"] = graph.capture(value, name=g.capture_name(name)) if hasattr(graph, "capture") else value
    register_library(graph_def)
    fetches = list(entry.outputs) + list(entry.control_outputs)
    imported = tf.graph_util.import_graph_def(graph_def, input_map=input_map, return_elements=fetches, name=scope)
    tensors, operations = imported[: len(entry.outputs)], imported[len(entry.outputs):]
    if operations:
        with tf.control_dependencies(operations):
            tensors = [tf.identity(t) for t in tensors]
    return list(tensors)


LARGE_CONSTANT_BYTES = 1 << 16


def _split_large_constants(entry: g.Entry):
    """(the entry's GraphDef with each large top-level Const turned into a Placeholder, the
    constants as eager tensors by node name); computed once per entry.

    Frozen weights imported as Const nodes would sit inside every function that calls the entry,
    and TensorFlow copies a function's body each time it builds a call to it (shape inference):
    for ResNet50 that is 100 MB per call op. Captured eager tensors stay outside the function
    bodies; SavedModel stores each once as a constant of its graph and feeds it to the functions.
    The rebuilt functions compute the same values; the GraphDef passes see is unchanged.
    """
    cached = entry.__dict__.get("_graphprune_split")
    if cached is not None:
        return cached
    large = [n for n in entry.graph_def.node
             if n.op == "Const" and len(n.attr["value"].tensor.tensor_content) >= LARGE_CONSTANT_BYTES]
    if not large:
        graph_def, constants = entry.graph_def, {}
    else:
        names = {n.name for n in large}
        graph_def = graph_pb2.GraphDef()
        graph_def.versions.CopyFrom(entry.graph_def.versions)
        graph_def.library.CopyFrom(entry.graph_def.library)
        constants = {}
        for node in entry.graph_def.node:
            if node.name not in names:
                graph_def.node.add().CopyFrom(node)
                continue
            tensor = node.attr["value"].tensor
            with tf.init_scope():
                constants[node.name] = tf.constant(tf.make_ndarray(tensor))
            placeholder = graph_def.node.add(name=node.name, op="Placeholder", device=node.device)
            placeholder.attr["dtype"].type = tensor.dtype
            placeholder.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
    # Entries are immutable: the split is cached on the entry, and lives as long as it does.
    object.__setattr__(entry, "_graphprune_split", (graph_def, constants))
    return graph_def, constants


def pack_outputs(structure, flat):
    """Put flat output tensors back into the entry's output structure (non-tensor leaves kept)."""
    flat = iter(flat)

    def fill(leaf):
        if isinstance(leaf, (tf.Tensor, tf.TensorSpec)) or hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            return next(flat)
        return leaf

    if structure is None:
        return None
    return tf.nest.map_structure(fill, structure)


def _parameter_name(name: str, position: int) -> str:
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"arg_{position}"


def build_entry_function(entry: g.Entry, variables: Mapping[str, tf.Variable]):
    """(tf.function computing ``entry`` with the original call signature, a callable tracing its
    concrete function)."""
    args_structure, kwargs_structure = entry.input_structure or ((), {})
    args_structure = tuple(args_structure)
    kwargs_structure = dict(kwargs_structure)
    positional = [_parameter_name(n, i) for i, n in enumerate(entry.parameters[: len(args_structure)])]
    positional += [f"arg_{i}" for i in range(len(positional), len(args_structure))]
    keyword_names = {key: _parameter_name(key, len(positional) + i) for i, key in enumerate(kwargs_structure)}
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in positional]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in keyword_names.values()]
    signature = inspect.Signature(parameters)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        args_values = tuple(bound.arguments[n] for n in positional)
        kwargs_values = {key: bound.arguments[n] for key, n in keyword_names.items()}
        flat = tf.nest.flatten((args_values, kwargs_values), expand_composites=True)
        return pack_outputs(entry.output_structure, import_entry(entry, flat, variables))

    call.__signature__ = signature
    call.__name__ = _parameter_name(entry.name.strip("_"), 0) or "call"
    if kwargs_structure:
        function = tf.function(call, autograph=False)
    else:
        # One trace for every call and for saving; without it SavedModel may trace (and store) it twice.
        function = tf.function(call, input_signature=list(args_structure), autograph=False)
    kwargs_specs = {keyword_names[k]: v for k, v in kwargs_structure.items()}
    return function, functools.partial(function.get_concrete_function, *args_structure, **kwargs_specs)


def build_alias_function(entry: g.Entry, method_function, method_entry: g.Entry | None = None):
    """A tf.function for a signature that calls ``method_function`` (see Entry.alias).

    It has an input_signature (positional parameters named like the signature's inputs), so
    SavedModel traces it in its save context, where it calls the method's save-context trace:
    the method's graph is stored once."""
    _, input_order, output_order = entry.alias
    _, kwargs_structure = entry.input_structure
    names = sorted(dict(kwargs_structure))
    signature = inspect.Signature(
        [inspect.Parameter(_parameter_name(n, i), inspect.Parameter.POSITIONAL_OR_KEYWORD) for i, n in enumerate(names)]
    )

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        flat = [bound.arguments[_parameter_name(n, i)] for i, n in enumerate(names)]
        arguments = [None] * len(flat)
        for position, method_index in enumerate(input_order):
            arguments[method_index] = flat[position]
        if method_entry is not None and method_entry.input_structure is not None:
            # The method's own structure (a dict of inputs, nested tuples, keywords): the flat
            # arguments are its leaves in order.
            args, kwargs = tf.nest.pack_sequence_as(tuple(method_entry.input_structure), arguments,
                                                    expand_composites=True)
            outputs = tf.nest.flatten(method_function(*args, **kwargs), expand_composites=True)
        else:
            outputs = tf.nest.flatten(method_function(*arguments))
        return pack_outputs(entry.output_structure, [outputs[i] for i in output_order])

    call.__signature__ = signature
    specs = [dict(kwargs_structure)[n] for n in names]
    return tf.function(call, input_signature=specs, autograph=False)


def keyword_concrete_function(function, entry: g.Entry):
    """A concrete function taking the signature's inputs by keyword only, like a loaded signature."""
    kwargs_structure = dict(entry.input_structure[1])

    def call(**kwargs):
        return function(**kwargs)

    return tf.function(call, autograph=False).get_concrete_function(**kwargs_structure)


def build_update_function(entry: g.Entry, variables: Mapping[str, tf.Variable]):
    """A no-argument tf.function running the update entry once per replica (cross-replica)."""

    def update():
        first = variables[next(iter(entry.resources.values()))]
        distributed = is_distributed(first)
        per_replica = []
        for replica, component in enumerate(_replica_components(first)):
            # Every replica holds the same weights, so each computes the same masks locally.
            with tf.device(component.device if distributed else None):
                per_replica.append(import_entry(entry, [], variables, replica=replica if distributed else None,
                                                scope=f"graphprune_update_{replica}"))
        # An update nobody consumes would be pruned at run time: tie every replica's to the result.
        with tf.control_dependencies([t for outputs in per_replica for t in outputs]):
            results = [tf.identity(t) for t in per_replica[0]]
        return pack_outputs(entry.output_structure, results)

    return tf.function(update, input_signature=[], autograph=False)
