"""What a pass is: its context, its result, its declared options, and the registry.

Passes import this module (never the pipeline), and the pipeline imports the passes: the
dependency runs one way.

    @register_pass("fold_masks", options=[Option("freeze", "bool", True, "fold into constants")],
                   invalidates=("weights",))
    def fold_masks(model, context, freeze=True) -> PassResult: ...

An option's type says how its text form (``fold_masks(freeze=false)``) is read and which Python
values it takes: bool, int, float, str, or object (Python callers only: a PruningConfig).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from graphprune import graph as g
from graphprune.errors import PassError


class VariableValues(Mapping):
    """Read-only current values by variable key: live variables read lazily, new ones from specs."""

    def __init__(self, variables: Mapping[str, Any] | None = None, overrides: Mapping[str, np.ndarray] | None = None):
        self._variables = dict(variables or {})
        self._cache: dict[str, np.ndarray] = dict(overrides or {})
        self._overridden = set(overrides or ())

    def variable(self, key: str):
        """The live variable holding ``key``'s value (None for a plain array or an override): a
        model built from these values can read it instead of a copy (weights are the only large
        data; finalizing a 1B-parameter model must not hold two copies of them)."""
        variable = None if key in self._overridden else self._variables.get(key)
        return variable if hasattr(variable, "assign") and hasattr(variable, "handle") else None

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


def entries_result(model: g.TracedModel, entries, key: str, names: list) -> PassResult:
    """The result of a pass that rewrote ``entries`` at the nodes ``names`` (use names), reported
    sorted under ``key``: the model unchanged where there are none."""
    if not names:
        return PassResult(model, changed=False, report={key: []})
    return PassResult(dataclasses.replace(model, entries=tuple(entries)), changed=True, report={key: sorted(names)})


_INTEGER = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf)", re.IGNORECASE)
OPTION_TYPES = ("bool", "int", "float", "str", "object")


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared option of a pass."""

    name: str
    type: str
    default: Any = None
    help: str = ""

    def __post_init__(self):
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name}: type must be one of {OPTION_TYPES}, got {self.type!r}")

    def accepts(self, value) -> bool:
        """Whether a Python value fits (None means 'the default')."""
        if value is None or self.type == "object":
            return True
        if self.type == "bool":
            return isinstance(value, (bool, np.bool_))
        if self.type == "int":
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if self.type == "float":
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        return isinstance(value, str) or (isinstance(value, (tuple, list)) and self.name in _SEQUENCE_OPTIONS)

    def parse(self, pass_name: str, raw: str):
        """The value of this option written as text; refused unless it reads as the type."""
        value = parse_value(raw)
        if self.type == "str" and not isinstance(value, str):
            value = raw.strip()
        if self.type == "object" or not self.accepts(value):
            raise PassError(f"pass '{pass_name}': option {self.name}={value!r} must be {self.type}"
                            + (" (Python callers only)" if self.type == "object" else ""))
        return value

    def describe(self) -> str:
        default = "" if self.default is None else f" = {self.default!r}"
        return f"{self.name}: {self.type}{default}" + (f"  {self.help}" if self.help else "")


# Options that Python callers may also give as a pair: block_size=(1, 2), m_by_n=(2, 4).
_SEQUENCE_OPTIONS = ("block_size", "m_by_n", "sparsity_for", "rules")


def parse_value(raw: str):
    """A value from text without a declared type: true/false, a decimal integer, a decimal float,
    a quoted string, else the text itself. Nothing is evaluated: '0x2' stays the text '0x2'."""
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


# The flat pruning settings make_config takes, as insert_masks and insert_mask_updates declare them.
CONFIG_OPTIONS = (
    Option("config", "object", None, "a PruningConfig (Python callers)"),
    Option("final_sparsity", "float", None, "schedule settings, as make_config takes them"),
    Option("initial_sparsity", "float", 0.0),
    Option("begin_step", "int", 0),
    Option("end_step", "int", None),
    Option("frequency", "int", 100),
    Option("power", "float", 3),
    Option("kind", "str", "polynomial", "polynomial or constant"),
    Option("block_size", "str", "1x1", "HxW blocks on rank-2 weights"),
    Option("block_pooling", "str", "AVG", "AVG or MAX"),
    Option("m_by_n", "str", None, "M:N along the input-channel axis, e.g. 2:4"),
    Option("scope", "str", "layer", "layer or global"),
    Option("exclude", "str", None, "regex of weights to skip"),
    Option("sparsity_for", "object", (), "REGEX=SPARSITY items"),
    Option("rules", "object", (), "graphprune.Rule items"),
)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """A registered pass: its function, declared options and the facts it makes stale."""

    name: str
    fn: Callable[..., PassResult]
    options: tuple[Option, ...] = ()
    invalidates: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

    def option(self, name: str) -> Option | None:
        return next((option for option in self.options if option.name == name), None)

    def check(self, options: Mapping) -> None:
        """Refuse options the pass does not declare and values of the wrong type, before it runs:
        a TypeError raised inside a pass is then the bug it is, not 'bad options'."""
        for key, value in options.items():
            option = self.option(key)
            if option is None:
                declared = ", ".join(o.name for o in self.options) or "none"
                raise PassError(f"pass '{self.name}' has no option '{key}' (its options: {declared}); "
                                "see `graphprune run --list`")
            if not option.accepts(value):
                raise PassError(f"pass '{self.name}': option {key}={value!r} must be {option.type}")


PassFn = Callable[..., PassResult]
REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str, fn: PassFn, options=(), invalidates=()) -> PassFn:
    """Register ``fn`` under ``name`` (its module's name) with its declared options."""
    REGISTRY[name] = PassSpec(name, fn, tuple(options), tuple(invalidates))
    return fn


def spec_of(fn: PassFn) -> PassSpec | None:
    """The registration of a pass function (None for an unregistered callable)."""
    return next((spec for spec in REGISTRY.values() if spec.fn is fn), None)
