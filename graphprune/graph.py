"""The data passes work on: a traced model as GraphDefs plus the variables they read.

A TracedModel is immutable: passes build a new one (``dataclasses.replace``) and never touch the
GraphDefs of the one they were given (they copy before editing, see ``copy_graph``).

    TracedModel
      entries:   one Entry per callable (signature, method, the mask update)
                   graph_def           flat GraphDef (+ library for While/If bodies)
                   inputs / outputs    placeholder names / tensor names, in flat order
                   resources           resource placeholder name -> variable key
      variables: key -> VariableSpec (existing variables, and the ones passes ask for)
      facts:     analysis results (``find_weights`` records ``weights`` here)
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, tensor_pb2
import tensorflow as tf

from graphprune.names import (ROLE_MASK, ROLE_OTHER, ROLE_STEP, ROLE_THRESHOLD, ROLE_WEIGHT, SCOPE,  # noqa: F401
                              capture_name, name_from_capture, node_scope)



@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """A variable the model reads.

    ``initial`` is None for variables that exist already (bound at rebuild by ``key``) and holds
    the starting value for the ones a pass asks for (masks, thresholds, the step). ``value`` is a
    value a pass assigned (fold_masks with freeze=False): it supersedes the live variable's.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    role: str = ROLE_OTHER
    trainable: bool = True
    initial: np.ndarray | None = None
    weight: str | None = None  # for masks and thresholds: the key of their weight
    value: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.key


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One flat input of an entry: the placeholder it feeds and its spec."""

    placeholder: str
    name: str
    shape: tuple[int | None, ...] | None
    dtype: str


@dataclasses.dataclass(frozen=True)
class Entry:
    """One callable of the model, as a flat GraphDef.

    ``input_structure`` / ``output_structure`` are nests (of TensorSpecs) that the flat inputs and
    outputs are packed into; ``parameters`` are the Python parameter names of the callable.
    """

    name: str
    kind: str  # "signature", "method" or "update"
    graph_def: graph_pb2.GraphDef
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[str, ...]
    resources: Mapping[str, str]
    input_structure: Any = None
    output_structure: Any = None
    parameters: tuple[str, ...] = ()
    control_outputs: tuple[str, ...] = ()
    # A signature that only calls a method entry's function (as SavedModel signatures do):
    # (method entry name, method flat input index per signature input, method flat output index
    # per signature output). Rebuilt as a call to that method, so the graph is stored once.
    alias: tuple | None = None
    # Placeholder -> the live object behind a non-variable capture: a lookup table (its resource
    # handle is captured) or an Asset (its path is captured). Passes carry it untouched; rebuild
    # captures the object's tensor again, and a model saved from it tracks the object, so
    # SavedModel re-creates the table and copies the asset into the new directory.
    captured_resources: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    # Which concrete trace of a polymorphic method this is (0, 1, ...): every trace is an entry of
    # its own, and the rebuilt method dispatches a call to the trace its arguments fit.
    trace: int = 0
    # Defaults of the original Python callable's parameters (``training=False``), where known:
    # a call that leaves them out runs the trace made with the default.
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def label(self) -> str:
        """'kind:name', with '#trace' for a method's second and later traces (unique per model)."""
        return f"{self.kind}:{self.name}" + (f"#{self.trace}" if self.trace else "")


@dataclasses.dataclass(frozen=True)
class TracedModel:
    entries: tuple[Entry, ...]
    variables: Mapping[str, VariableSpec]
    facts: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def entry(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def with_facts(self, **facts) -> "TracedModel":
        merged = dict(self.facts)
        merged.update(facts)
        return dataclasses.replace(self, facts=MappingProxyType(merged))

    def without_facts(self, *names: str) -> "TracedModel":
        return dataclasses.replace(self, facts=MappingProxyType({k: v for k, v in self.facts.items() if k not in names}))

    def with_variables(self, specs: Iterable[VariableSpec], drop: Iterable[str] = ()) -> "TracedModel":
        merged = dict(self.variables)
        for key in drop:
            merged.pop(key, None)
        for spec in specs:
            merged[spec.key] = spec
        return dataclasses.replace(self, variables=MappingProxyType(merged))


# ---------------------------------------------------------------------------------------------
# GraphDef helpers


def copy_graph(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    new = graph_pb2.GraphDef()
    new.CopyFrom(graph_def)
    return new


def parse_input(name: str) -> tuple[str, int, bool]:
    """'^a' -> ('a', -1, True); 'a:1' -> ('a', 1, False); 'a' -> ('a', 0, False)."""
    if name.startswith("^"):
        return name[1:], -1, True
    node, _, index = name.partition(":")
    return node, int(index) if index else 0, False


def tensor_name(node: str, index: int = 0) -> str:
    return node if index == 0 else f"{node}:{index}"


class NodeIndex:
    """Name -> node and node -> consumers for one GraphDef (top level)."""

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self.graph_def = graph_def
        self.nodes = {node.name: node for node in graph_def.node}
        self.consumers: dict[str, list[tuple[node_def_pb2.NodeDef, int]]] = {}
        for node in graph_def.node:
            for position, raw in enumerate(node.input):
                source, _, _ = parse_input(raw)
                self.consumers.setdefault(source, []).append((node, position))

    def producer(self, raw_input: str) -> node_def_pb2.NodeDef | None:
        return self.nodes.get(parse_input(raw_input)[0])


def make_node(name: str, op: str, inputs: Iterable[str] = (), **attrs) -> node_def_pb2.NodeDef:
    node = node_def_pb2.NodeDef(name=name, op=op)
    node.input.extend(inputs)
    for attr_name, value in attrs.items():
        if isinstance(value, tf.dtypes.DType):
            node.attr[attr_name].type = value.as_datatype_enum
        elif isinstance(value, tensor_pb2.TensorProto):
            node.attr[attr_name].tensor.CopyFrom(value)
        elif isinstance(value, attr_value_pb2.AttrValue):
            node.attr[attr_name].CopyFrom(value)
        elif isinstance(value, bool):
            node.attr[attr_name].b = value
        elif isinstance(value, int):
            node.attr[attr_name].i = value
        elif isinstance(value, (list, tuple)):
            node.attr[attr_name].shape.CopyFrom(shape_proto(value))
        else:
            raise TypeError(f"unsupported attr {attr_name}={value!r}")
    return node


def shape_proto(shape):
    from tensorflow.core.framework import tensor_shape_pb2

    proto = tensor_shape_pb2.TensorShapeProto()
    for size in shape:
        proto.dim.add(size=-1 if size is None else int(size))
    return proto


def resource_placeholder(name: str) -> node_def_pb2.NodeDef:
    return make_node(name, "Placeholder", dtype=tf.resource, shape=[])


def const_node(name: str, value: np.ndarray, dtype: str) -> node_def_pb2.NodeDef:
    tf_dtype = tf.dtypes.as_dtype(dtype)
    array = np.asarray(value)
    if array.size <= 1 or tf_dtype == tf.string:
        proto = tf.make_tensor_proto(array, dtype=tf_dtype)
    else:
        # What make_tensor_proto writes for a numeric array, with one copy of the bytes instead
        # of several (frozen weights can be hundreds of megabytes).
        proto = tensor_pb2.TensorProto(dtype=tf_dtype.as_datatype_enum,
                                       tensor_shape=tf.TensorShape(array.shape).as_proto(),
                                       tensor_content=np.ascontiguousarray(array, tf_dtype.as_numpy_dtype).tobytes())
    return make_node(name, "Const", value=proto, dtype=tf_dtype)


def node_dtype(node: node_def_pb2.NodeDef, attr: str = "T") -> str:
    return tf.dtypes.as_dtype(node.attr[attr].type).name


def rename_functions(graph_def: graph_pb2.GraphDef, suffix_of) -> graph_pb2.GraphDef:
    """A copy whose library functions are renamed ``name -> name + suffix_of(function_def)``,
    with every reference (node attrs, function bodies, gradients) updated."""
    renamed = copy_graph(graph_def)
    mapping = {f.signature.name: f.signature.name + suffix_of(f) for f in renamed.library.function}

    def fix(nodes):
        for node in nodes:
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in mapping:
                    attr.func.name = mapping[attr.func.name]
                for func in attr.list.func:
                    if func.name in mapping:
                        func.name = mapping[func.name]

    fix(renamed.node)
    for function in renamed.library.function:
        function.signature.name = mapping[function.signature.name]
        fix(function.node_def)
    for gradient in renamed.library.gradient:
        gradient.function_name = mapping.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = mapping.get(gradient.gradient_func, gradient.gradient_func)
    return renamed


def content_suffix(function_def) -> str:
    """'_gp' + a short hash of the function's body: equal bodies, equal names."""
    import hashlib  # pylint: disable=import-outside-toplevel

    body = function_def.SerializeToString(deterministic=True)
    return "_gp" + hashlib.sha1(body).hexdigest()[:12]


_CONTENT_SUFFIX = re.compile(r"_gp[0-9a-f]{12}$")


def strip_content_suffix(name: str) -> str:
    """A function's name without the suffix content_suffix gave it."""
    return _CONTENT_SUFFIX.sub("", name)


def op_counts(graph_def: graph_pb2.GraphDef) -> Counter:
    """Op types in the graph and in every library function body."""
    counts = Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        counts.update(node.op for node in function.node_def)
    return counts


def count_diff(before: Counter, after: Counter) -> list[str]:
    """tf2onnx-style op-count lines: 'Mul +2 (3->5)'."""
    lines = []
    for op in sorted(set(before) | set(after)):
        if before[op] != after[op]:
            lines.append(f"{op} {after[op] - before[op]:+d} ({before[op]}->{after[op]})")
    return lines

