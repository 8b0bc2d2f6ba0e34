"""Passes, their registry, and the pipeline that runs them with a check after each.

A pass is a plain function ``pass_fn(model, context, **options) -> PassResult``: it reads a
TracedModel and a frozen context and returns a new TracedModel plus a report; it never mutates
its input. Each module in ``graphprune.passes`` registers one pass under its own module name.

A pipeline can be written as text, like TF's graph transform tool:

    find_weights insert_masks(sparsity=0.8, block_size=1x2) fold_masks
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Callable, Mapping

import numpy as np

from graphprune import graph as g
from graphprune.errors import PassError


class VariableValues(Mapping):
    """Read-only current values by variable key: live variables read lazily, new ones from specs."""

    def __init__(self, variables: Mapping[str, Any] | None = None, overrides: Mapping[str, np.ndarray] | None = None):
        self._variables = dict(variables or {})
        self._cache: dict[str, np.ndarray] = dict(overrides or {})

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            variable = self._variables[key]
            self._cache[key] = np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)
        return self._cache[key]

    def __iter__(self):
        return iter(set(self._variables) | set(self._cache))

    def __len__(self):
        return len(set(self._variables) | set(self._cache))


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph: current variable values (read-only)."""

    values: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def value(self, model: g.TracedModel, key: str) -> np.ndarray:
        """A pass-assigned value, else the live variable's, else the new variable's initial value."""
        spec = model.variables[key]
        if spec.value is not None:
            return np.asarray(spec.value)
        if key in self.values:
            return np.asarray(self.values[key])
        if spec.initial is not None:
            return np.asarray(spec.initial)
        raise PassError(f"the value of variable '{key}' is needed but the pass context has none; pass values=")


@dataclasses.dataclass(frozen=True)
class PassResult:
    model: g.TracedModel
    changed: bool
    report: dict = dataclasses.field(default_factory=dict)


PassFn = Callable[..., PassResult]
REGISTRY: dict[str, PassFn] = {}


def register_pass(name: str, fn: PassFn) -> PassFn:
    """Register ``fn`` under ``name`` (the module's name, by convention)."""
    REGISTRY[name] = fn
    return fn


def registry() -> dict[str, PassFn]:
    import graphprune.passes  # noqa: F401  (registers every pass)

    return dict(REGISTRY)


def describe_registry() -> str:
    lines = []
    for name, fn in sorted(registry().items()):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines.append(f"  {name:22s} {summary}")
    return "\n".join(lines)


_STEP = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(([^()]*)\))?")


def parse_pipeline(text: str) -> list[tuple[str, dict]]:
    """'a b(x=1, y=1x2)' -> [('a', {}), ('b', {'x': 1, 'y': '1x2'})]; unknown names are refused."""
    known = registry()
    steps, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _STEP.match(text, position)
        if not match or match.end() == position:
            raise PassError(f"cannot parse the pass list at {text[position:][:30]!r}; write 'name(key=value, ...) name2'")
        name, arguments = match.group(1), match.group(2)
        if name not in known:
            raise PassError(f"unknown pass '{name}'; registered passes: {', '.join(sorted(known))}")
        steps.append((name, _parse_arguments(name, arguments or "")))
        position = match.end()
        while position < len(text) and text[position] in " \t\n,;":
            position += 1
    return steps


_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf)", re.IGNORECASE)


def parse_value(raw: str):
    """A pass option's value from text: true/false, a decimal integer, a decimal float, a quoted
    string, else the text itself. Nothing else is evaluated: '0x2' stays the text '0x2'."""
    raw = raw.strip()
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if _INTEGER.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def _parse_arguments(pass_name: str, text: str) -> dict:
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise PassError(f"pass '{pass_name}': argument {part!r} is not key=value")
        options[key.strip()] = parse_value(raw)
    return options


_OPTION_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float)}


def check_options(name: str, fn: PassFn, options: Mapping) -> None:
    """Refuse options the pass does not declare and values of the wrong type (by its annotations),
    before it runs: a TypeError raised inside a pass is then the bug it is, not 'bad options'."""
    import inspect

    parameters = dict(list(inspect.signature(fn).parameters.items())[2:])  # after (model, context)
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in options.items():
        parameter = parameters.get(key)
        if parameter is None:
            if open_ended:
                continue
            declared = ", ".join(parameters) or "none"
            raise PassError(f"pass '{name}' has no option '{key}' (its options: {declared}); see `graphprune run --list`")
        annotation = parameter.annotation if isinstance(parameter.annotation, str) else getattr(
            parameter.annotation, "__name__", "")
        types = _OPTION_TYPES.get(annotation)
        if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise PassError(f"pass '{name}': option {key}={value!r} must be {annotation}")


def validate(model: g.TracedModel) -> None:
    """Raise ValueError if an entry's graph is broken: dangling inputs, unknown resources, or a
    GraphDef that TensorFlow refuses to import. A signature that aliases a method of the model
    (Entry.alias) is rebuilt as a call to that method and its own graph is never imported, so it
    gets the structural checks only."""
    import tensorflow as tf

    methods = {entry.name for entry in model.entries if entry.kind == "method"}
    for entry in model.entries:
        index = g.NodeIndex(entry.graph_def)
        if len(index.nodes) != len(entry.graph_def.node):
            names = Counter(n.name for n in entry.graph_def.node)
            raise ValueError(f"entry '{entry.name}': duplicate node names {[n for n, c in names.items() if c > 1][:3]}")
        for node in entry.graph_def.node:
            for raw in node.input:
                if g.parse_input(raw)[0] not in index.nodes:
                    raise ValueError(f"entry '{entry.name}': node '{node.name}' reads missing '{raw}'")
        for placeholder, key in entry.resources.items():
            if placeholder not in index.nodes:
                raise ValueError(f"entry '{entry.name}': resource placeholder '{placeholder}' is missing")
            if key not in model.variables:
                raise ValueError(f"entry '{entry.name}': placeholder '{placeholder}' maps to unknown variable '{key}'")
        for name in list(entry.outputs) + list(entry.control_outputs):
            if g.parse_input(name.split(":")[0])[0] not in index.nodes:
                raise ValueError(f"entry '{entry.name}': output '{name}' is missing")
        if entry.alias is not None and entry.alias[0] in methods:
            continue
        with tf.Graph().as_default():
            try:
                tf.graph_util.import_graph_def(_without_large_constants(entry.graph_def), name="")
            except (ValueError, TypeError, tf.errors.OpError) as error:
                raise ValueError(f"entry '{entry.name}': {str(error).splitlines()[0]}") from error


def _without_large_constants(graph_def):
    """A copy for validation whose big Const values keep dtype and shape but drop their bytes:
    importing checks types and shapes only. Big constants are never copied (frozen weights would
    make every validation copy hundreds of megabytes)."""
    from tensorflow.core.framework import graph_pb2

    def is_large(node):
        return node.op == "Const" and len(node.attr["value"].tensor.tensor_content) > 4096

    def light_copy(node, target):
        if not is_large(node):
            target.CopyFrom(node)
            return
        target.name, target.op, target.device = node.name, node.op, node.device
        target.input.extend(node.input)
        for key, attr in node.attr.items():
            if key != "value":
                target.attr[key].CopyFrom(attr)
        tensor = node.attr["value"].tensor
        target.attr["value"].tensor.dtype = tensor.dtype
        target.attr["value"].tensor.tensor_shape.CopyFrom(tensor.tensor_shape)

    light = graph_pb2.GraphDef()
    light.versions.CopyFrom(graph_def.versions)
    for node in graph_def.node:
        light_copy(node, light.node.add())
    for function in graph_def.library.function:
        copy = light.library.function.add()
        copy.signature.CopyFrom(function.signature)
        for field in ("attr", "arg_attr", "resource_arg_unique_id", "ret", "control_ret"):
            getattr(copy, field).MergeFrom(getattr(function, field))
        for node in function.node_def:
            light_copy(node, copy.node_def.add())
    for field in ("gradient", "registered_gradients"):
        getattr(light.library, field).extend(getattr(graph_def.library, field))
    return light


@dataclasses.dataclass
class PipelineResult:
    model: g.TracedModel
    reports: list[tuple[str, PassResult, list[str]]]

    def summary(self) -> str:
        lines = []
        for name, result, diff in self.reports:
            lines.append(f"{name}: {'changed' if result.changed else 'unchanged'}" + (f"  [{', '.join(diff)}]" if diff else ""))
        return "\n".join(lines)


def run_pipeline(
    model: g.TracedModel,
    steps,
    context: PassContext | None = None,
    *,
    check: bool = True,
    after_pass: Callable[[str, g.TracedModel, g.TracedModel], None] | None = None,
) -> PipelineResult:
    """Run ``steps`` (text, or a list of (name, options) / (fn, options)) in order.

    After every pass that returns a new model, the model is validated; a failure names the pass
    and the ones before it.
    ``after_pass(name, before, after)`` is called after each pass (verification hooks).
    """
    if isinstance(steps, str):
        steps = parse_pipeline(steps)
    context = context or PassContext()
    known = registry()
    reports = []
    done: list[str] = []
    for step, options in steps:
        fn = known[step] if isinstance(step, str) else step
        name = step if isinstance(step, str) else getattr(fn, "__name__", str(fn))
        before_counts = _counts(model)
        check_options(name, fn, options)
        result = fn(model, context, **options)
        if check and result.model is not model:
            try:
                validate(result.model)
            except ValueError as error:
                after = f" (after {', '.join(done)})" if done else " (first pass)"
                raise PassError(f"pass '{name}'{after} left an invalid graph: {error}") from error
        if after_pass is not None:
            after_pass(name, model, result.model)
        reports.append((name, result, g.count_diff(before_counts, _counts(result.model))))
        done.append(name)
        model = result.model
    return PipelineResult(model=model, reports=reports)


def _counts(model: g.TracedModel) -> Counter:
    total = Counter()
    for entry in model.entries:
        total.update(g.op_counts(entry.graph_def))
    return total
