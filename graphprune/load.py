"""Edge: turn what a user hands us into a TracedModel and the live variables it reads.

Accepted targets: a SavedModel directory, a tf.Module (its ``__call__`` and its tf.functions that
have an input signature or exactly one trace), a tf.function with an input signature, or a
ConcreteFunction.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import re
from types import MappingProxyType
from typing import Any

import tensorflow as tf

from graphprune import body as b
from graphprune import compat
from graphprune import graph as g
from graphprune.names import role_of
from graphprune.errors import BadModelError, OpLibraryError, UnsupportedError, first_line
from graphprune.rebuild import captured_tensor, is_distributed

# Functions a graphprune PrunableModel adds; they are machinery, not entries to rewrite.
RESERVED_FUNCTIONS = ("update_masks", "prune_now")
_GENERIC_VARIABLE_NAME = re.compile(r"^(Variable|unknown)(_\d+)?$")


@dataclasses.dataclass
class Loaded:
    """A traced model, the live variables by key, and the object that keeps them alive."""

    model: g.TracedModel
    variables: dict[str, tf.Variable]
    owner: Any = None
    source: str = ""


def inline_functions(concrete_function) -> tf.compat.v1.GraphDef:
    """Grappler's function inlining, as ``convert_variables_to_constants_v2`` runs it.

    Calls (StatefulPartitionedCall/PartitionedCall) are inlined into one flat GraphDef; While and
    If stay functional (their bodies remain in the library). This is a private TF helper: the
    test ``test_load.py::test_inline_helper_is_available`` pins the TF versions it works with.
    """
    graph_def = compat.inline_functions(concrete_function)
    # Grappler may rewrite a loop body and keep its name ('while_body_12'), while the original
    # under that name stays registered in the process: two definitions of one name, which
    # SavedModel refuses. Bodies are named by their content instead.
    return g.rename_functions(_without_python_gradients(graph_def), g.content_suffix)


def _without_python_gradients(graph_def):
    """Drop the ``_gradient_op_type`` of tf.custom_gradient ops (Keras 3 swish/silu, ...).

    The name points at a Python gradient function registered by the original trace, whose closure
    holds tensors of that trace's graph: in the rebuilt graph, taking a gradient raises 'tensor
    ... is out of scope'. Without it the op (an IdentityN over the forward result) takes its
    own gradient, so gradients flow through the forward ops that computed the result: the true
    derivative (what swish's custom gradient computes, with less memory). A custom gradient that
    is deliberately not the derivative (a straight-through estimator) is not kept; SavedModel
    itself cannot store such a gradient either."""
    def strip(nodes):
        for node in nodes:
            if "_gradient_op_type" in node.attr:
                del node.attr["_gradient_op_type"]

    strip(graph_def.node)
    for function in graph_def.library.function:
        strip(function.node_def)
    return graph_def


def load(target, *, name: str | None = None) -> Loaded:
    """Trace ``target`` into a TracedModel; see the module docstring for what is accepted."""
    if isinstance(target, (str, os.PathLike)):
        return _load_saved_model(os.fspath(target))
    if _is_concrete_function(target):
        return _trace({(name or "__call__", "method", 0): target}, owner=target, source="concrete function")
    if _is_polymorphic_function(target):
        return _trace({(name or "__call__", "method", i): f for i, f in enumerate(_concretes_of(target, "the function"))},
                      owner=target, source="tf.function", defaults={name or "__call__": _defaults_of(target)})
    if isinstance(target, tf.Module) or compat.is_trackable(target):
        methods = _module_functions(target)
        functions = {(n, "method", i): f for n, traces in methods.items() for i, f in enumerate(traces)}
        defaults = {n: _defaults_of(getattr(target, n)) for n in methods}
        return _trace(functions, owner=target, source=type(target).__name__, defaults=defaults)
    raise BadModelError(
        f"cannot prune a {type(target).__name__}: pass a SavedModel directory, a tf.Module, a tf.function "
        "with input_signature or a ConcreteFunction (a Keras model: model.export(dir) first)"
    )


def _is_concrete_function(obj) -> bool:
    return isinstance(obj, tf.types.experimental.ConcreteFunction)


def _is_polymorphic_function(obj) -> bool:
    return isinstance(obj, tf.types.experimental.PolymorphicFunction)


def _defaults_of(function) -> dict:
    """Parameter defaults of a tf.function's Python callable (also kept by a loaded SavedModel)."""
    spec = getattr(getattr(function, "function_spec", None), "fullargspec", None)
    if spec is None:
        return {}
    defaults = dict(zip(spec.args[len(spec.args) - len(spec.defaults or ()):], spec.defaults or ()))
    defaults.update(spec.kwonlydefaults or {})
    return {k: v for k, v in defaults.items() if v is None or isinstance(v, (bool, int, float, str))}


def _concretes_of(function, what: str) -> list:
    """Every concrete trace of a tf.function: its input_signature's, else all it was traced with."""
    signature = getattr(function, "input_signature", None)
    if signature is not None:
        return [function.get_concrete_function()]
    traced = _traced_concrete_functions(function)
    if traced:
        return traced
    raise BadModelError(
        f"{what} has no input_signature and was never called: decorate it with "
        "@tf.function(input_signature=[tf.TensorSpec(shape, dtype), ...]) or call it once first"
    )


def _traced_concrete_functions(function) -> list:
    return compat.traced_concrete_functions(function)


def _module_functions(module) -> dict:
    """The module's tf.functions that can be traced without guessing shapes: its class's methods and
    the ones set on the instance with an input_signature (``self.serve = tf.function(...)``, which
    tf.saved_model.save exports too). An instance function traced without one is not taken: tf-keras
    keeps its fit loop so (``model.train_function``, traced on an iterator)."""
    functions = {}
    for attr_name, attr in inspect.getmembers(type(module)):
        if attr_name in RESERVED_FUNCTIONS or not _is_polymorphic_function(attr):
            continue
        bound = getattr(module, attr_name)
        if bound.input_signature is not None or _traced_concrete_functions(bound):
            functions[attr_name] = _concretes_of(bound, f"{type(module).__name__}.{attr_name}")
    for attr_name, attr in sorted(vars(module).items()):
        if attr_name.startswith("_") or attr_name in RESERVED_FUNCTIONS or attr_name in functions or \
                not _is_polymorphic_function(attr):
            continue
        if attr.input_signature is not None:
            functions[attr_name] = _concretes_of(attr, f"{type(module).__name__}.{attr_name}")
    if not functions:
        raise BadModelError(
            f"{type(module).__name__} has no tf.function with an input_signature: decorate __call__ with "
            "@tf.function(input_signature=[...]) or pass module.__call__.get_concrete_function(spec)"
        )
    return functions


# Libraries whose ops a SavedModel may use (a text model's tokenizer), imported when a model
# needs an op TensorFlow does not have and the library is installed: importing one registers them.
OP_LIBRARIES = ("tensorflow_text",)
_UNREGISTERED_OP = re.compile(r"Op type not registered '([^']+)'")
LOADED_LIBRARIES: list[str] = []  # what load_op_libraries loaded, in order (for the message below)


def load_op_libraries(libraries) -> None:
    """Register the ops of each library: a compiled one (a path to a .so, tf.load_op_library) or an
    installed Python module that registers them when imported (the CLI's --op_library). Each is
    loaded once. OpLibraryError (one line) where one is neither."""
    import importlib

    for library in libraries:
        library = str(library).strip()
        if not library:
            raise OpLibraryError("--op_library= is blank; give a compiled op library's path (.so) or a module name")
        if library in LOADED_LIBRARIES:
            continue
        if os.sep in library or library.endswith((".so", ".dylib", ".dll")):
            if not os.path.isfile(library):
                raise OpLibraryError(f"--op_library={library}: no such file; give the path of the compiled op "
                                     "library (.so) that defines the model's ops")
            try:
                tf.load_op_library(os.path.abspath(library))
            except Exception as error:  # a library built for another TensorFlow, or not one at all
                raise OpLibraryError(f"--op_library={library}: TensorFlow cannot load it ({first_line(error, 200)}); "
                                     f"build it against this TensorFlow ({tf.__version__})") from None
        else:
            try:
                importlib.import_module(library)
            except ModuleNotFoundError as error:
                if error.name is None or not library.startswith(error.name):
                    raise OpLibraryError(f"--op_library={library}: importing it fails ({first_line(error, 200)})") \
                        from None
                raise OpLibraryError(f"--op_library={library}: no such module installed (pip install it), and no "
                                     "such file (a compiled library's path ends in .so)") from None
            except Exception as error:
                raise OpLibraryError(f"--op_library={library}: importing it fails ({first_line(error, 200)})") \
                    from None
        LOADED_LIBRARIES.append(library)


def load_saved_model(path: str):
    """tf.saved_model.load(path), with the op libraries of OP_LIBRARIES that are installed
    imported first where the model uses ops TensorFlow does not have (tensorflow_text's
    tokenizers). BadModelError (one line) where it cannot be loaded, naming an op no library gave."""
    return with_op_libraries(lambda: tf.saved_model.load(path), path, "re-export it")


def with_op_libraries(call, path: str, advice: str):
    """``call()``, called again after importing an installed library of OP_LIBRARIES each time it
    fails on an op TensorFlow does not have. BadModelError (one line) where it still fails:
    naming the op, or quoting the error and then ``advice``."""
    imported = []
    while True:
        try:
            return call()
        except Exception as error:  # TF raises many types for broken files
            text = str(error).strip()
            missing = _UNREGISTERED_OP.search(text)
            if missing:
                library = next((name for name in OP_LIBRARIES if name not in imported + LOADED_LIBRARIES
                                and _imports(name)), None)
                if library is not None:
                    imported.append(library)
                    continue
                tried = LOADED_LIBRARIES + imported
                tried = f" ({', '.join(tried)} loaded, and it is not theirs)" if tried else ""
                raise BadModelError(
                    f"{path}: the SavedModel uses op '{missing.group(1)}', which this TensorFlow does not have"
                    f"{tried}; load the library that defines it first: --op_library=MODULE or "
                    "--op_library=PATH.so on the command line (import it, or tf.load_op_library, in Python)") \
                    from error
            raise BadModelError(f"{path}: cannot load the SavedModel ({first_line(error, 200)}); {advice}") from error


def _imports(module: str) -> bool:
    """Import ``module`` if it is installed; whether it is now imported."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return False
        importlib.import_module(module)
        return True
    except Exception:  # a broken install: as if it were not there
        return False


def _load_saved_model(path: str) -> Loaded:
    if not os.path.isdir(path):
        raise BadModelError(f"{path}: no such directory; pass the directory that holds saved_model.pb")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise BadModelError(f"{path}: not a SavedModel (no saved_model.pb); export it with tf.saved_model.save or model.export")
    loaded = load_saved_model(path)
    # A Keras export has both a 'serve' signature (keyword inputs) and a 'serve' function
    # (positional inputs): both become entries, told apart by kind.
    functions: dict[tuple[str, str, int], Any] = {}
    defaults = {}
    for signature_name, function in loaded.signatures.items():
        functions[(signature_name, "signature", 0)] = function
    for attr_name, child in _children(loaded).items():
        if attr_name in RESERVED_FUNCTIONS or not _is_polymorphic_function(child):
            continue
        for trace, function in enumerate(_traced_concrete_functions(child)):
            functions[(attr_name, "method", trace)] = function
        defaults[attr_name] = _defaults_of(child)
    if not functions:
        raise BadModelError(f"{path}: the SavedModel has no signature or traced function; save it with signatures=...")
    return _trace(functions, owner=loaded, source=path, defaults=defaults)


def _children(obj) -> dict:
    return compat.trackable_children(obj)


def _variable_paths(owner) -> dict[int, tuple[str, Any]]:
    """id(variable) -> (first attribute path to it, the variable), for naming variables that have
    generic names and for finding the distributed variable a captured component belongs to."""
    paths: dict[int, tuple[str, Any]] = {}
    seen = set()
    queue = [(owner, "")]
    while queue:
        obj, prefix = queue.pop(0)
        if id(obj) in seen or len(seen) > 100_000:
            continue
        seen.add(id(obj))
        if isinstance(obj, tf.Variable):
            paths.setdefault(id(obj), (prefix, obj))
            continue
        for child_name, child in _children(obj).items():
            if child_name.startswith("_") or child_name in ("signatures",) or _is_polymorphic_function(child):
                continue
            queue.append((child, f"{prefix}/{child_name}" if prefix else child_name))
    return paths


def _resource_objects(owner) -> dict[int, Any]:
    """id(captured tensor) -> the table (TrackableResource) or Asset the owner tracks, at any depth."""
    found, seen, queue = {}, set(), [owner]
    while queue:
        obj = queue.pop(0)
        if id(obj) in seen or len(seen) > 100_000 or isinstance(obj, tf.Variable):
            continue
        seen.add(id(obj))
        if isinstance(obj, (tf.saved_model.Asset, tf.saved_model.experimental.TrackableResource)):
            try:
                found[id(captured_tensor(obj))] = obj
            except (AttributeError, TypeError, ValueError):
                pass
        for child_name, child in _children(obj).items():
            if child_name != "signatures" and not _is_polymorphic_function(child):
                queue.append(child)
    return found


def _trace(functions: dict, *, owner, source: str, defaults: dict | None = None) -> Loaded:
    """functions: (entry name, kind, trace) -> ConcreteFunction."""
    variables: dict[str, tf.Variable] = {}
    resource_objects = None
    key_of: dict[int, str] = {}
    specs: dict[str, g.VariableSpec] = {}
    paths = _variable_paths(owner)
    # Traced in cross-replica context, a function captures the primary component of a distributed
    # variable; the model must hold the distributed variable itself.
    parents = {id(component): variable for _, variable in paths.values() if is_distributed(variable)
               for component in variable.values}
    entries = []
    for (entry_name, kind, trace), function in functions.items():
        captured_variables = {id(v.handle): parents.get(id(v), v) for v in function.graph.variables}
        resources = {}
        constants = {}
        captured_resources = {}
        for external, internal in function.graph.captures:
            variable = captured_variables.get(id(external))
            if variable is None:
                if resource_objects is None:
                    resource_objects = _resource_objects(owner)
                if id(external) in resource_objects:
                    captured_resources[internal.op.name] = resource_objects[id(external)]
                    continue
                if external.dtype == tf.resource:
                    raise UnsupportedError(
                        f"{entry_name}: captures a resource that is neither a variable nor a lookup table its model "
                        f"tracks ({internal.op.name}); pass the tf.Module or SavedModel that owns it"
                    )
                constants[internal.op.name] = external
                continue
            if id(variable) not in key_of:
                key = _variable_key(variable, paths, variables)
                key_of[id(variable)] = key
                variables[key] = variable
                specs[key] = _spec_of(key, variable)
            resources[internal.op.name] = key_of[id(variable)]
        graph_def = inline_functions(function)
        if constants:
            graph_def = _inline_captured_constants(graph_def, constants)
        b.inline_calls(graph_def, resources)
        b.annotate_resource_arguments(graph_def, resources, specs)
        node_names = {node.name for node in graph_def.node}
        n_user_inputs = len(function.inputs) - len(function.graph.captures)
        inputs = tuple(
            g.TensorInfo(
                placeholder=t.op.name,
                name=t.op.name,
                shape=tuple(t.shape.as_list()) if t.shape.rank is not None else None,
                dtype=t.dtype.name,
            )
            for t in function.inputs[:n_user_inputs]
        )
        entries.append(
            g.Entry(
                name=entry_name,
                kind=kind,
                graph_def=graph_def,
                inputs=inputs,
                outputs=tuple(t.name for t in function.outputs),
                resources=MappingProxyType(resources),
                input_structure=function.structured_input_signature,
                output_structure=function.structured_outputs,
                parameters=tuple(function.function_type.parameters),
                control_outputs=tuple(op.name for op in function.graph.control_outputs if op.name in node_names),
                captured_resources=MappingProxyType(captured_resources),
                trace=trace,
                defaults=MappingProxyType((defaults or {}).get(entry_name, {})),
            )
        )
    entries = _mark_aliases(entries, functions)
    for names_for in (_names_for_shared_variable_names, _names_for_masked_weights):
        renamed = names_for(entries, variables)
        if renamed:
            entries = [dataclasses.replace(e, resources=MappingProxyType({p: renamed.get(k, k) for p, k in
                                                                          e.resources.items()})) for e in entries]
            variables = {renamed.get(k, k): v for k, v in variables.items()}
            specs = {renamed.get(k, k): dataclasses.replace(spec, key=renamed.get(k, k)) for k, spec in specs.items()}
    model = g.TracedModel(entries=tuple(entries), variables=MappingProxyType(specs))
    return Loaded(model=model, variables=variables, owner=owner, source=source)


_SCOPE_UNIQUIFIER = re.compile(r"_\d+$")


def _names_for_masked_weights(entries, variables) -> dict[str, str]:
    """Keys for the weights of a prunable model graphprune saved, where a weight's key (which its
    mask's key names: 'kernel/graphprune/mask') came from an attribute path of the user's module
    (a variable with a generic name, ``tf.Variable(...)`` unnamed): saved, the variable is found
    at 'original_variables/0'. The weight each mask multiplies in the graph takes the key its
    mask names, where that key is free. Returns old key -> new key."""
    from graphprune.analysis import is_mask_multiply, mask_operand_key

    missing = {key: weight for key in variables for role, weight in [role_of(key)]
               if weight is not None and weight not in variables}
    if not missing:
        return {}
    renamed = {}

    def visit(body):
        for node in body.nodes:
            if not is_mask_multiply(node):
                continue
            mask, read = mask_operand_key(body, node), body.producer(node.input[0])
            weight = body.read_key(read) if read is not None else None
            if mask in missing and weight is not None and role_of(weight)[0] == g.ROLE_OTHER:
                renamed.setdefault(weight, missing[mask])

    for entry in entries:
        b.visit_entry(entry, visit)
    claimed = collections.Counter(renamed.values())  # a key two weights would take goes to neither
    return {old: new for old, new in renamed.items() if claimed[new] == 1 and new not in variables}


def _names_for_shared_variable_names(entries, variables) -> dict[str, str]:
    """Keys for variables that share one TensorFlow name, from the name scope they are read in.

    Keras 3 names a nested layer's variable after the outer layer ('block1a_/kernel' for the
    kernel of 'block1a_/block1a_expand_conv'), so several weights share a name; the scope of the
    op that reads each one still says which layer it belongs to:
    '.../block1a__1/block1a_expand_conv_1/convolution/ReadVariableOp'. The outer layer's scope
    segment shows the suffix TensorFlow added to make that trace's scopes unique ('_1' above);
    the same suffix is taken off the inner layer's segment. Returns old key -> new key."""
    groups: dict[str, list[str]] = {}
    for key, variable in variables.items():
        groups.setdefault(variable.name.split(":")[0], []).append(key)
    shared = {key: name for name, keys in groups.items() if len(keys) > 1 for key in keys}
    if not shared:
        return {}
    reads: dict[str, str] = {}
    for entry in entries:
        top = b.top_body(entry.graph_def, dict(entry.resources), writable=False)
        for node in entry.graph_def.node:
            key = top.read_key(node)
            if key in shared and key not in reads:
                reads[key] = node.name
    renamed = {}
    for key, name in shared.items():
        new = _scoped_name(name, reads.get(key, ""))
        if new and new not in variables and new not in renamed.values():
            renamed[key] = new
    return renamed


def _scoped_name(variable_name: str, read_name: str) -> str | None:
    *outer, leaf = variable_name.split("/")
    segments = read_name.split("/")[:-2]  # without the reading op's own scope and name
    if not outer:
        return None
    for start in range(len(segments) - len(outer)):
        window = segments[start:start + len(outer)]
        suffix = window[-1][len(outer[-1]):] if window[-1].startswith(outer[-1]) else None
        if suffix is None or (suffix and not _SCOPE_UNIQUIFIER.fullmatch(suffix)):
            continue
        if window[:-1] != outer[:-1] and [_strip(w, suffix) for w in window[:-1]] != outer[:-1]:
            continue
        inner = [_strip(segment, suffix) for segment in segments[start + len(outer):]]
        if inner:
            return "/".join(outer + inner + [leaf])
    return None


def _strip(segment: str, suffix: str) -> str:
    return segment[: -len(suffix)] if suffix and segment.endswith(suffix) else segment


def _mark_aliases(entries, functions) -> list:
    """Mark signature entries whose graph is one call of a method entry's function."""
    method_by_function = {
        _function_name(function): name for (name, kind, _), function in functions.items() if kind == "method"
    }
    marked = []
    for entry in entries:
        alias = None
        if entry.kind == "signature" and method_by_function:
            alias = _alias_of(functions[(entry.name, "signature", 0)], entry, method_by_function)
        marked.append(dataclasses.replace(entry, alias=alias) if alias else entry)
    return marked


def _function_name(function) -> str:
    name = function.name
    return name.decode() if isinstance(name, bytes) else str(name)


def _alias_of(function, entry, method_by_function):
    graph_def = function.graph.as_graph_def()
    nodes = {node.name: node for node in graph_def.node}
    calls = [n for n in graph_def.node if n.op in ("StatefulPartitionedCall", "PartitionedCall")]
    if len(calls) != 1 or calls[0].attr["f"].func.name not in method_by_function:
        return None
    call = calls[0]
    call_inputs = [i for i in call.input if not i.startswith("^")]
    try:
        input_order = tuple(call_inputs.index(info.placeholder) for info in entry.inputs)
    except ValueError:
        return None
    if sorted(input_order) != list(range(len(entry.inputs))):
        return None
    output_order = []
    for output in entry.outputs:
        node = nodes.get(output.split(":")[0])
        while node is not None and node.op == "Identity":
            source = node.input[0]
            node = nodes.get(source.split(":")[0])
        if node is None or node.name != call.name:
            return None
        output_order.append(int(source.split(":")[1]) if ":" in source else 0)
    return (method_by_function[call.attr["f"].func.name], input_order, tuple(output_order))


def _variable_key(variable, paths: dict, taken: dict) -> str:
    name = variable.name.split(":")[0]
    if _GENERIC_VARIABLE_NAME.match(name) and paths.get(id(variable), ("",))[0]:
        name = paths[id(variable)][0]
    key, suffix = name, 1
    while key in taken:
        key = f"{name}_{suffix}"
        suffix += 1
    return key


def _spec_of(key: str, variable) -> g.VariableSpec:
    role, weight = role_of(key)
    return g.VariableSpec(
        key=key,
        shape=tuple(variable.shape.as_list()),
        dtype=variable.dtype.name,
        role=role,
        trainable=bool(variable.trainable) and role == g.ROLE_OTHER,
        weight=weight,
    )


def _inline_captured_constants(graph_def, constants: dict) -> tf.compat.v1.GraphDef:
    """Eager tensors captured by value become Const nodes under the placeholder's name."""
    for node in graph_def.node:
        if node.name in constants:
            value = constants[node.name]
            replacement = g.const_node(node.name, value.numpy(), value.dtype.name)
            node.Clear()
            node.CopyFrom(replacement)
    return graph_def
