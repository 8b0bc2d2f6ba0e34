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

from graphprune import compat
from graphprune import graph as g
from graphprune import names
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
        live[key] = new_variable(
            spec.initial,
            name=key,
            dtype=spec.dtype,
            trainable=spec.trainable,
            # Masks, thresholds and the step are written only by the cross-replica update.
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    return live


def new_variable(value, **kwargs) -> tf.Variable:
    """tf.Variable(value, **kwargs), where a NumPy value broadcast from one element (the all-ones
    masks insert_masks starts with) is filled in TensorFlow: never materialized in NumPy first."""
    value = np.asarray(value)
    if value.size > 1 and not any(value.strides):
        dtype = kwargs.get("dtype") or value.dtype
        with tf.init_scope():
            return tf.Variable(tf.fill(value.shape, tf.constant(value.flat[0], dtype)), **kwargs)
    return tf.Variable(value, **kwargs)


def shared_variable(values, key: str, spec) -> tf.Variable | None:
    """The live variable that holds ``key``'s current value (see VariableValues.variable), if a
    rebuilt model may read it directly instead of a copy: not where a pass assigned a value, not
    for a distributed variable, and only under its own name (the saved variable keeps its name)."""
    lookup = getattr(values, "variable", None)
    variable = lookup(key) if lookup is not None and spec.value is None else None
    if variable is None or is_distributed(variable) or variable.name.split(":")[0] != key:
        return None
    return variable if variable.dtype.name == tf.dtypes.as_dtype(spec.dtype).name else None


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
    for function_def in graph_def.library.function:
        compat.register_function_def(function_def)


def import_entry(entry: g.Entry, flat_inputs, variables: Mapping[str, tf.Variable], *, replica: int | None = None,
                 scope: str = names.IMPORT_SCOPE):
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
        input_map[placeholder] = compat.capture(graph, variable.handle)
        compat.watch_variable(graph, variable)
    present = None
    for placeholder, obj in entry.captured_resources.items():
        present = present if present is not None else {node.name for node in entry.graph_def.node}
        if placeholder in present:  # a pass may have stripped a capture nothing reads any more
            tensor = captured_tensor(obj)
            input_map[placeholder] = compat.capture(graph, tensor)
    graph_def, constants = _split_large_constants(entry)
    for name, value in constants.items():
        input_map[f"{name}:0"] = compat.capture(graph, value, name=names.capture_name(name))
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


def _binder(entry: g.Entry):
    """(inspect.Signature of the traced callable, its positional names, kwargs key -> parameter)."""
    args_structure, kwargs_structure = entry.input_structure or ((), {})
    args_structure, kwargs_structure = tuple(args_structure), dict(kwargs_structure)
    positional = [_parameter_name(n, i) for i, n in enumerate(entry.parameters[: len(args_structure)])]
    positional += [f"arg_{i}" for i in range(len(positional), len(args_structure))]
    keyword_names = {key: _parameter_name(key, len(positional) + i) for i, key in enumerate(kwargs_structure)}
    empty = inspect.Parameter.empty
    originals = list(entry.parameters[: len(args_structure)]) + [None] * len(args_structure)
    # A default is kept only from the first defaulted parameter on, as Python requires.
    positional_defaults, seen_default = [], False
    for original, name in zip(originals, positional):
        default = entry.defaults.get(original, empty) if original is not None else empty
        seen_default |= default is not empty
        positional_defaults.append(default if seen_default and default is not empty else empty)
    if seen_default and empty in positional_defaults[positional_defaults.index(next(
            d for d in positional_defaults if d is not empty)):]:
        positional_defaults = [empty] * len(positional)
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                  for n, d in zip(positional, positional_defaults)]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=entry.defaults.get(key, empty))
                   for key, n in keyword_names.items()]
    return inspect.Signature(parameters), positional, keyword_names


def _bound_values(entry: g.Entry, args, kwargs):
    """(args, kwargs) of a call as the entry's structure nests them; raises TypeError if they do not bind."""
    signature, positional, keyword_names = _binder(entry)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return (tuple(bound.arguments[n] for n in positional),
            {key: bound.arguments[n] for key, n in keyword_names.items()})


def _call_entry(entry: g.Entry, variables, values):
    """Run the entry on bound call values; Python values of the trace (``training=False``) are
    part of its structure but not of its graph's inputs."""
    specs = tf.nest.flatten(_structure(entry), expand_composites=True)
    flat = [value for value, spec in zip(tf.nest.flatten(values, expand_composites=True), specs) if _is_spec(spec)]
    return pack_outputs(entry.output_structure, import_entry(entry, flat, variables))


def _structure(entry: g.Entry):
    args_structure, kwargs_structure = entry.input_structure or ((), {})
    return tuple(args_structure), dict(kwargs_structure)


def _is_spec(leaf) -> bool:
    return isinstance(leaf, tf.TypeSpec)


def build_entry_function(entry: g.Entry, variables: Mapping[str, tf.Variable]):
    """(tf.function computing ``entry`` with the original call signature, a callable tracing its
    concrete function)."""
    args_structure, kwargs_structure = _structure(entry)
    signature, _, keyword_names = _binder(entry)

    def call(*args, **kwargs):
        return _call_entry(entry, variables, _bound_values(entry, args, kwargs))

    call.__signature__ = signature
    call.__name__ = _parameter_name(entry.name.strip("_"), 0) or "call"
    if kwargs_structure or not all(_is_spec(s) for s in tf.nest.flatten(args_structure)):
        function = tf.function(call, autograph=False)
    else:
        # One trace for every call and for saving; without it SavedModel may trace (and store) it twice.
        function = tf.function(call, input_signature=list(args_structure), autograph=False)
    kwargs_specs = {keyword_names[k]: v for k, v in kwargs_structure.items()}
    return function, functools.partial(function.get_concrete_function, *args_structure, **kwargs_specs)


def _fits(entry: g.Entry, values) -> bool:
    """Whether bound call values fit a trace: same nesting, tensors compatible with its specs and
    Python values (``training=True``) equal to the traced ones."""
    structure = _structure(entry)
    try:
        tf.nest.assert_same_structure(structure, values, expand_composites=False)
    except (ValueError, TypeError):
        return False
    for spec, value in zip(tf.nest.flatten(structure), tf.nest.flatten(values)):
        if _is_spec(spec):
            try:
                tensor = tf.convert_to_tensor(value, dtype=getattr(spec, "dtype", None))
            except (TypeError, ValueError):
                return False
            if not spec.is_compatible_with(tensor):
                return False
        elif spec != value:
            return False
    return True


def build_polymorphic_function(entries, variables: Mapping[str, tf.Variable]):
    """(one tf.function over every trace of a polymorphic method, a callable tracing the first):
    a call runs the first trace its arguments fit; each trace is traced now, so SavedModel
    stores them all, as the original had them."""
    first = entries[0]

    def call(*args, **kwargs):
        for entry in entries:
            try:
                values = _bound_values(entry, args, kwargs)
            except TypeError:
                continue
            if _fits(entry, values):
                return _call_entry(entry, variables, values)
        raise TypeError(f"{first.name}: the arguments fit none of its {len(entries)} traced signatures")

    call.__signature__ = _binder(first)[0]
    call.__name__ = _parameter_name(first.name.strip("_"), 0) or "call"
    function = tf.function(call, autograph=False)
    concretes = []
    for entry in entries:
        args_structure, kwargs_structure = _structure(entry)
        keyword_names = _binder(entry)[2]
        concretes.append(functools.partial(function.get_concrete_function, *args_structure,
                                           **{keyword_names[k]: v for k, v in kwargs_structure.items()}))
    return function, concretes


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
                                                scope=names.update_import_scope(replica)))
        # An update nobody consumes would be pruned at run time: tie every replica's to the result.
        with tf.control_dependencies([t for outputs in per_replica for t in outputs]):
            results = [tf.identity(t) for t in per_replica[0]]
        return pack_outputs(entry.output_structure, results)

    return tf.function(update, input_signature=[], autograph=False)
