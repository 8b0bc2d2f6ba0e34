"""Passes, their registry, and the pipeline that runs them with a check after each.

A pass is a plain function ``pass_fn(model, context, **options) -> PassResult`` (see passbase): it
reads a TracedModel and a frozen context and returns a new TracedModel plus a report; it never
mutates its input. Each module in ``graphprune.passes`` registers one pass under its own module
name, with its options declared. After a pass, facts it declares stale are dropped unless it
recorded them anew, and the graph is validated (structure, acyclicity, TensorFlow's import).

A pipeline can be written as text, like TF's graph transform tool:

    find_weights insert_masks(sparsity=0.8, block_size=1x2) fold_masks
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Callable, Mapping

import graphprune.passes  # noqa: F401  (registers every pass; the passes never import this module)
from graphprune import body as b
from graphprune import graph as g
from graphprune.analysis import FACT_TYPES
from graphprune.errors import PassError
from graphprune.passbase import (REGISTRY, Option, PassContext, PassFn, PassResult, PassSpec,  # noqa: F401
                                 VariableValues, parse_value, register_pass, spec_of)


def registry() -> dict[str, PassFn]:
    """Registered pass name -> pass function."""
    return {name: spec.fn for name, spec in REGISTRY.items()}


def specs() -> dict[str, PassSpec]:
    """Registered pass name -> its registration (options, invalidated facts)."""
    return dict(REGISTRY)


def describe_registry() -> str:
    """What `graphprune run --list` prints: each pass, its summary and its declared options."""
    lines = []
    for name, spec in sorted(REGISTRY.items()):
        lines.append(f"  {name:22s} {spec.summary}")
        for option in spec.options:
            lines.append(f"      {option.describe()}")
    return "\n".join(lines)


_STEP = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(([^()]*)\))?")


def parse_pipeline(text: str) -> list[tuple[str, dict]]:
    """'a b(x=1, y=1x2)' -> [('a', {}), ('b', {'x': 1, 'y': '1x2'})]; each value is read as the
    type its pass declares for it; unknown passes and options are refused."""
    steps, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _STEP.match(text, position)
        if not match or match.end() == position:
            raise PassError(f"cannot parse the pass list at {text[position:][:30]!r}; write 'name(key=value, ...) name2'")
        name, arguments = match.group(1), match.group(2)
        if name not in REGISTRY:
            raise PassError(f"unknown pass '{name}'; registered passes: {', '.join(sorted(REGISTRY))}")
        steps.append((name, _parse_arguments(REGISTRY[name], arguments or "")))
        position = match.end()
        while position < len(text) and text[position] in " \t\n,;":
            position += 1
    return steps


def _parse_arguments(spec: PassSpec, text: str) -> dict:
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise PassError(f"pass '{spec.name}': argument {part!r} is not key=value")
        option = spec.option(key)
        if option is None:
            spec.check({key: None})  # the refusal that lists the declared options
        options[key] = option.parse(spec.name, raw)
    return options


def check_options(name: str, fn: PassFn, options: Mapping) -> None:
    """Refuse undeclared options and values of the wrong type before a pass runs."""
    spec = spec_of(fn)
    if spec is not None:
        spec.check(options)


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
        _check_acyclic(entry)
        with tf.Graph().as_default():
            try:
                tf.graph_util.import_graph_def(_without_large_constants(entry.graph_def), name="")
            except (ValueError, TypeError, tf.errors.OpError) as error:
                raise ValueError(f"entry '{entry.name}': {str(error).splitlines()[0]}") from error


def _check_facts(pass_name: str, model: g.TracedModel) -> None:
    """Every recorded fact has the type analysis.FACT_TYPES declares for it."""
    for fact, kind in FACT_TYPES.items():
        if fact in model.facts and not isinstance(model.facts[fact], kind):
            raise PassError(f"pass '{pass_name}' recorded fact '{fact}' as {type(model.facts[fact]).__name__}, "
                            f"not {kind.__name__}: a bug in the pass")


def _check_acyclic(entry: g.Entry) -> None:
    """A rewrite that wires a node into its own inputs leaves a graph TensorFlow may import and
    then hang or fail on at run time: refuse it here, naming the cycle."""
    import networkx as nx

    graph_def = entry.graph_def
    bodies = [b.top_body(graph_def, dict(entry.resources), writable=False)]
    bodies += [b.Body(f, function=True, resources={}, library={}, writable=False) for f in graph_def.library.function]
    for body in bodies:
        dependencies = b.dependency_graph(body)
        if not nx.is_directed_acyclic_graph(dependencies):
            cycle = " -> ".join(edge[0] for edge in nx.find_cycle(dependencies))
            where = f"function '{body.name}'" if body.is_function else "the graph"
            raise ValueError(f"entry '{entry.name}': {where} has a cycle ({cycle})")


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
        spec = spec_of(fn)
        if spec is not None and spec.invalidates and result.model is not model:
            # A fact the pass made stale and did not record anew is dropped, never read stale.
            stale = [f for f in spec.invalidates if f in result.model.facts and result.model.facts[f] is model.facts.get(f)]
            if stale:
                result = dataclasses.replace(result, model=result.model.without_facts(*stale))
        _check_facts(name, result.model)
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
