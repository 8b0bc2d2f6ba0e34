"""PrunableModel: the user's model with masked weights, as a tf.Module that trains and saves."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import tensorflow as tf

from graphprune import graph as g
from graphprune import names
from graphprune import rebuild
from graphprune.errors import GraphPruneError
from graphprune.masks import pruned_values, store_pruned

UPDATE_ENTRY = "update_masks"


class PrunableModel(tf.Module):
    """Callable like the original: same inputs, outputs and signatures, with every pruned weight
    read through its mask.

    - ``trainable_variables``: the original model's trainable variables (masks are not trainable).
    - ``masks`` / ``thresholds`` / ``step``: the pruning state; ``pruned_weights``: the weights.
    - ``update_masks()``: advance the step by one and, when the schedule says so, recompute the
      masks and zero the pruned weights. Call it once per training step.
    - ``signatures``: concrete functions by signature name, for ``graphprune.save``.
    """

    def __init__(self, traced: g.TracedModel, variables, *, config=None, name: str = "prunable_model",
                 trace_now: bool = True):
        """trace_now=False defers tracing the entries' concrete functions to their first use: a
        model built only to be saved (finalize) is then traced once, in SavedModel's own context."""
        super().__init__(name=name)
        live = rebuild.create_variables(traced, variables)
        self._graphprune = _State(traced, live, config)
        self.original_variables = [live[k] for k, s in traced.variables.items() if s.role == g.ROLE_OTHER]
        self.masks = [live[k] for k, s in traced.variables.items() if s.role == g.ROLE_MASK]
        self.thresholds = [live[k] for k, s in traced.variables.items() if s.role == g.ROLE_THRESHOLD]
        self.pruned_weights = [live[s.weight] for s in traced.variables.values() if s.role == g.ROLE_MASK]
        steps = [live[k] for k, s in traced.variables.items() if s.role == g.ROLE_STEP]
        self.step = steps[0] if steps else None
        # Tables and assets the graphs capture: tracked, so SavedModel saves them with the model.
        unique = {id(obj): obj for entry in traced.entries for obj in entry.captured_resources.values()}
        self.captured_resources = list(unique.values())
        functions = {}
        methods = {e.name for e in traced.entries if e.kind == "method"}
        traces = {}  # method name -> its traces (entries), in order
        for entry in traced.entries:
            if entry.kind == "method":
                traces.setdefault(entry.name, []).append(entry)
        # Methods first, so that signatures aliasing them can call them.
        for entry in sorted(traced.entries, key=lambda e: e.kind != "method"):
            if entry.kind == "update":
                self.update_masks = rebuild.build_update_function(entry, live)
                continue
            if entry.kind == "method" and entry.trace > 0:
                continue  # built with trace 0 into one dispatching function
            if entry.alias is not None and entry.alias[0] in methods:
                method_entry = _trace_called_by(entry, traces[entry.alias[0]])
                alias = rebuild.build_alias_function(entry, functions[entry.alias[0]], method_entry)
                self._graphprune.signatures[entry.name] = functools.partial(rebuild.keyword_concrete_function, alias,
                                                                            entry)
                self._graphprune.save_signatures[entry.name] = alias
                continue
            if entry.kind == "method" and len(traces[entry.name]) > 1:
                function, concretes = rebuild.build_polymorphic_function(traces[entry.name], live)
                concrete = concretes[0]
                for number, extra in enumerate(concretes[1:], start=1):
                    self._graphprune.concrete[f"{entry.name}#{number}"] = extra
            else:
                function, concrete = rebuild.build_entry_function(entry, live)
            self._graphprune.concrete[entry.name] = concrete
            if entry.kind == "signature":
                self._graphprune.signatures[entry.name] = concrete
                if any(e.name == entry.name and e.kind == "method" for e in traced.entries):
                    continue  # the method of the same name owns the attribute
            functions[entry.name] = function
            if entry.name == "__call__":
                # The instance attribute is what SavedModel exports (so the reloaded object is
                # callable); Python's call syntax goes through the class's __call__ below.
                self.__dict__["__call__"] = function
            elif entry.name.isidentifier():
                setattr(self, entry.name, function)
        default_name = next((n for n in ("__call__", "serving_default") if n in functions), next(iter(functions)))
        self._graphprune.default = functions[default_name]
        self._graphprune.default_name = default_name
        if trace_now:
            self._graphprune.signatures.resolve()
            self._graphprune.concrete.resolve()

    def __call__(self, *args, **kwargs):
        return self._graphprune.default(*args, **kwargs)

    @property
    def signatures(self) -> dict:
        return self._graphprune.signatures.resolve()

    @property
    def traced(self) -> g.TracedModel:
        """The rewritten graphs this model runs (read-only)."""
        return self._graphprune.traced

    @property
    def variables_by_key(self) -> dict:
        return dict(self._graphprune.variables)

    @property
    def config(self):
        return self._graphprune.config

    def weights(self) -> list[dict]:
        """Per pruned weight: name, op types, shape, elements, nonzeros and current sparsity."""
        from graphprune.analysis import weights_of

        by_key = {w.key: w for w in weights_of(self.traced)}
        rows = []
        for key, spec in self.traced.variables.items():
            if spec.role != g.ROLE_MASK:
                continue
            weight = self._graphprune.variables[spec.weight].numpy()
            mask = self._graphprune.variables[key].numpy()
            info = by_key.get(spec.weight)
            rows.append({
                "name": spec.weight,
                "op": ",".join(info.ops) if info else "",
                "shape": list(weight.shape),
                "elements": int(weight.size),
                "nonzeros": int(np.count_nonzero(weight * mask)),
                "sparsity": float(1.0 - np.count_nonzero(mask) / max(mask.size, 1)),
            })
        return rows

    def skipped(self) -> dict[str, str]:
        """Weights that feed a prunable op but are not pruned, each with the reason (a non-float
        dtype, a weight computed from variables by ops graphprune does not follow, ...)."""
        from graphprune.analysis import find_prunable_weights

        if "skipped_weights" in self.traced.facts:
            return dict(self.traced.facts["skipped_weights"])
        return dict(find_prunable_weights(self.traced)[1])

    def sparsity(self) -> float:
        """Overall sparsity of the pruned weights (zeros in masks / elements)."""
        rows = self.weights()
        total = sum(r["elements"] for r in rows)
        return 1.0 - sum(r["nonzeros"] for r in rows) / total if total else 0.0

    def write_summaries(self, step=None, writer=None) -> None:
        """TensorBoard scalars at ``step`` (default: the pruning step): per weight
        ``pruning/<weight>/sparsity`` and ``/threshold``, ``pruning/sparsity`` overall and
        ``pruning/target_sparsity`` (the main schedule's target at that step)."""
        live = self._graphprune.variables
        step = int(self.step.numpy()) if step is None and self.step is not None else (step or 0)
        context = writer.as_default() if writer is not None else contextlib.nullcontext()
        with context:
            for row in self.weights():
                _scalar(f"pruning/{row['name']}/sparsity", row["sparsity"], step)
                threshold_key = names.threshold_key(row["name"])
                if threshold_key in live:
                    _scalar(f"pruning/{row['name']}/threshold", float(live[threshold_key].numpy()), step)
            _scalar("pruning/sparsity", self.sparsity(), step)
            if self.config is not None:
                _scalar("pruning/target_sparsity", float(self.config.schedule(tf.constant(step, tf.int64))[1]), step)
            removed = self.channel_sparsity()
            if removed is not None:
                _scalar("pruning/channel_sparsity", removed, step)

    def channel_sparsity(self) -> float | None:
        """With structure='channel': the fraction of the pruned groups' channels removed (what the
        schedule's target measures; ``sparsity()`` counts the weights' zeros, which lose a
        kernel's rows and columns both). None for other structures."""
        from graphprune.update import channel_sparsity

        groups = self.traced.facts.get("channel_groups")
        if not groups or self.config is None:
            return None
        from graphprune.analysis import weights_of

        live = self._graphprune.variables
        weights = [w for w in weights_of(self.traced) if w.mask is not None and w.mask in live]
        plans, _ = self.config.plan(weights)
        masks = {w.key: live[w.mask] for w in weights if w.key in plans and plans[w.key].structure.channels}
        removed = channel_sparsity({key: tf.convert_to_tensor(mask) for key, mask in masks.items()}, groups)
        return None if removed is None else float(removed)

    def apply_masks(self) -> None:
        """Zero the stored pruned weights now (w := w * mask), without advancing the step.

        The forward pass always reads w * mask and pruned weights get zero gradients, so with SGD
        the stored values stay zero. Optimizers with momentum (Adam, ...) still move them between
        mask updates; the model's outputs are unaffected, but call this before writing a
        checkpoint that must be sparse on disk (PruningCallback does at every epoch end)."""
        live = self._graphprune.variables
        for key, spec in self.traced.variables.items():
            if spec.role == g.ROLE_MASK:
                store_pruned(live[spec.weight], live[key])

    def prune_now(self, sparsity: float | None = None) -> None:
        """One-shot: set every mask to its plan's final sparsity (or ``sparsity``) now and zero the
        pruned weights, with the same computation the in-graph update uses."""
        from graphprune.analysis import weights_of
        from graphprune.update import compute_masks

        if self.config is None:
            raise GraphPruneError("this PrunableModel has no pruning config; build it with graphprune.prune(schedule=...)")
        config = self.config
        if sparsity is not None:
            config = dataclasses.replace(config, schedule=config.schedule.with_final_sparsity(sparsity))
        live = self._graphprune.variables
        weights = [w for w in weights_of(self.traced) if w.mask is not None and w.mask in live]
        plans, _ = config.plan(weights)
        weights = [w for w in weights if w.key in plans]
        values = {w.key: live[w.key].read_value() for w in weights}
        targets = {w.key: tf.constant(plans[w.key].schedule.final_sparsity, tf.float32) for w in weights}
        alive = {w.key: live[w.mask].read_value() for w in weights}
        groups = ()
        if any(plan.structure.channels for plan in plans.values()):
            from graphprune.channels import channel_groups

            groups = channel_groups(self.traced)  # the recorded fact, or found now (a reloaded model)
        computed = compute_masks(values, plans, targets, {w.key: w.input_axis for w in weights}, alive,
                                 groups=groups)
        for weight in weights:
            mask, threshold = computed[weight.key]
            live[weight.mask].assign(tf.cast(mask, live[weight.mask].dtype))
            threshold_key = names.threshold_key(weight.key)
            if threshold_key in live:
                live[threshold_key].assign(threshold)
            live[weight.key].assign(pruned_values(values[weight.key], mask))


def _trace_called_by(signature: g.Entry, method_traces: list) -> g.Entry:
    """The trace of a method that a signature's graph calls: the one whose inputs have the
    signature's dtypes and shapes (in the call's order)."""
    _, input_order, _ = signature.alias
    for trace in method_traces:
        if len(trace.inputs) != len(signature.inputs):
            continue
        pairs = [(signature.inputs[position], trace.inputs[index]) for position, index in enumerate(input_order)]
        if all(a.dtype == b.dtype and a.shape == b.shape for a, b in pairs):
            return trace
    return method_traces[0]


def _scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar without importing TensorBoard (tf.summary.scalar needs it installed)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


class _State:
    """Python-side state kept off tf.Module's tracking (it is not saved; the graphs are)."""

    def verify_summary(self) -> str:
        from graphprune.verify import format_report

        return format_report(self.verify_report)

    def __init__(self, traced, variables, config):
        self.traced = traced
        self.variables = variables
        self.config = config
        self.signatures = _Traced()
        self.save_signatures = {}  # what tf.saved_model.save gets, where it differs from signatures
        self.concrete = _Traced()
        self.default = None
        self.default_name = None
        self.owner = None
        self.pipeline = None
        self.verify_report = None


class _Traced(dict):
    """Concrete functions by name, each traced on first access (values may be zero-argument
    callables that trace it)."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if callable(value) and not isinstance(value, tf.types.experimental.ConcreteFunction):
            value = value()
            self[name] = value
        return value

    def resolve(self) -> dict:
        return {name: self[name] for name in list(self)}
