"""What to prune and how: the schedule, the structure, layer-wise or global, per-weight rules.

    config = PruningConfig(
        schedule=PolynomialDecay(0.0, 0.9, 0, 1000, frequency=100),
        structure=Structure(block_size=(1, 2)),
        scope="global",
        rules=[Rule("depthwise", skip=True), Rule("dense_1/kernel", sparsity=0.5)],
    )

A rule's ``pattern`` is a regular expression searched in the weight's name, its op types and the
names of the ops that use it; the first matching rule applies.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

from graphprune.errors import ScheduleError, StructureError
from graphprune.masks import POOLINGS, check_block, check_m_by_n
from graphprune.schedules import ConstantSparsity, PolynomialDecay, PruningSchedule, check_sparsity

SCOPES = ("layer", "global")


def _whole_numbers(parts, what: str, value) -> tuple[int, ...]:
    """Each part as an int: decimal digits in text, or an integral Python/NumPy integer; a float
    (1.5), a bool or anything else is refused rather than truncated."""
    numbers = []
    for part in parts:
        if isinstance(part, str) and re.fullmatch(r"\s*[0-9]+\s*", part):
            numbers.append(int(part))
        elif isinstance(part, (int, np.integer)) and not isinstance(part, (bool, np.bool_)):
            numbers.append(int(part))
        else:
            raise StructureError(f"{what}, got {value!r}")
    return tuple(numbers)


def parse_block_size(value) -> tuple[int, int]:
    """'1x2', (1, 2) or [1, 2] -> (1, 2)."""
    if isinstance(value, str):
        parts = re.split(r"[xX,]", value.strip())
    elif value is None:
        parts = [1, 1]
    else:
        try:
            parts = list(value)
        except TypeError:
            raise StructureError(f"block_size must look like 1x2 or (1, 2), got {value!r}") from None
    block = _whole_numbers(parts, "block_size must be two whole numbers like 1x2", value)
    if len(block) != 2 or min(block) < 1:
        raise StructureError(f"block_size must be two positive integers like 1x2, got {value!r}")
    return block


def parse_m_by_n(value) -> tuple[int, int] | None:
    """'2:4', (2, 4) -> (2, 4); None stays None."""
    if value is None or value == "":
        return None
    try:
        parts = re.split(r"[:xX,/]", value.strip()) if isinstance(value, str) else list(value)
    except TypeError:
        raise StructureError(f"m_by_n must look like 2:4 or (2, 4), got {value!r}") from None
    numbers = _whole_numbers(parts, "m_by_n must be two whole numbers like 2:4", value)
    if len(numbers) != 2:
        raise StructureError(f"m_by_n must be two whole numbers like 2:4, got {value!r}")
    m, n = numbers
    if not 0 < m < n:
        raise StructureError(f"m_by_n must be M:N with 0 < M < N (M pruned of every N), got {value!r}")
    return m, n


STRUCTURES = ("element", "channel")
IMPORTANCES = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class Structure:
    """Unstructured (default), blocks (``block_size``, ``block_pooling``), M:N (``m_by_n``) or
    whole channels (``kind="channel"``: output channels, neurons, with their dependency groups;
    scored by the group's ``importance``, "l2" or "l1"; the kept count rounded up to a multiple
    of ``round_to`` values, so that kernels get channel counts that suit them: a head of 64
    values is already 64 of them; channels.rounding). ``residual_stream``
    (channels only): also remove channels that normalization layers average over, a
    transformer's hidden size; their means are then taken over the kept channels, so the masked
    model computes what the shrunk one will."""

    block_size: tuple[int, int] = (1, 1)
    block_pooling: str = "AVG"
    m_by_n: tuple[int, int] | None = None
    kind: str = "element"
    importance: str = "l2"
    round_to: int = 1
    residual_stream: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block_size", parse_block_size(self.block_size))
        object.__setattr__(self, "m_by_n", parse_m_by_n(self.m_by_n))
        pooling = str(self.block_pooling).upper()
        if pooling not in POOLINGS:
            raise StructureError(f"block_pooling must be AVG or MAX, got {self.block_pooling!r}")
        object.__setattr__(self, "block_pooling", pooling)
        if self.m_by_n is not None and self.block_size != (1, 1):
            raise StructureError("choose either block_size or m_by_n, not both")
        kind = str(self.kind).lower().rstrip("s") if isinstance(self.kind, str) else self.kind
        if kind not in STRUCTURES:
            raise StructureError(f"structure must be 'element' (unstructured, blocks, M:N) or 'channel', got "
                                 f"{self.kind!r}")
        object.__setattr__(self, "kind", kind)
        importance = str(self.importance).lower()
        if importance not in IMPORTANCES:
            raise StructureError(f"importance must be 'l2' or 'l1', got {self.importance!r}")
        object.__setattr__(self, "importance", importance)
        (round_to,) = _whole_numbers([self.round_to], "round_to must be a whole number >= 1", self.round_to)
        if round_to < 1:
            raise StructureError(f"round_to must be a whole number >= 1, got {self.round_to!r}")
        object.__setattr__(self, "round_to", round_to)
        if not isinstance(self.residual_stream, bool):
            raise StructureError(f"residual_stream must be True or False, got {self.residual_stream!r}")
        if self.residual_stream and kind != "channel":
            raise StructureError("residual_stream=True removes channels: it needs structure='channel'")
        if kind == "channel" and (self.m_by_n is not None or self.block_size != (1, 1)):
            raise StructureError("structure='channel' removes whole channels: leave block_size and m_by_n unset")

    @property
    def channels(self) -> bool:
        return self.kind == "channel"

    @property
    def unstructured(self) -> bool:
        return self.m_by_n is None and self.block_size == (1, 1) and not self.channels

    def check(self, weight) -> None:
        """Raise StructureError if this structure cannot apply to ``weight`` (a WeightInfo)."""
        if self.channels:
            return
        if self.m_by_n is not None:
            check_m_by_n(weight.shape, self.m_by_n, weight.input_axis, weight.key)
        else:
            try:
                check_block(weight.shape, self.block_size)
            except StructureError as error:
                raise StructureError(f"{weight.key}: {error}") from None

    def describe(self) -> str:
        if self.channels:
            rounding = f", kept counts rounded up to a multiple of {self.round_to}" if self.round_to > 1 else ""
            stream = ", through layer norms (residual stream)" if self.residual_stream else ""
            return f"channels ({self.importance}{rounding}{stream})"
        if self.m_by_n is not None:
            return f"{self.m_by_n[0]}:{self.m_by_n[1]}"
        if self.block_size != (1, 1):
            return f"block {self.block_size[0]}x{self.block_size[1]} {self.block_pooling}"
        return "unstructured"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Per-weight override selected by regex: skip it, give it its own sparsity (a number: the
    global schedule's shape ending there; or a schedule) and/or its own structure."""

    pattern: str
    skip: bool = False
    sparsity: float | PruningSchedule | None = None
    structure: Structure | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ScheduleError(f"Rule needs a regular expression (a non-empty string) as its pattern, got "
                                f"{self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ScheduleError(f"rule pattern {self.pattern!r} is not a valid regular expression: {error}") from None
        if not isinstance(self.skip, (bool, np.bool_)):
            raise ScheduleError(f"Rule({self.pattern!r}): skip must be True or False, got {self.skip!r}")
        if self.sparsity is not None and not isinstance(self.sparsity, PruningSchedule):
            object.__setattr__(self, "sparsity", check_sparsity("sparsity", self.sparsity))
        if self.structure is not None and not isinstance(self.structure, Structure):
            raise ScheduleError(f"Rule({self.pattern!r}): structure must be a graphprune.Structure, got "
                                f"{type(self.structure).__name__}")

    def matches(self, weight) -> bool:
        haystack = [weight.key, *weight.ops, *(use.node for use in weight.uses)]
        return any(re.search(self.pattern, text) for text in haystack)


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """How one weight is pruned: resolved from the config and the first matching rule."""

    key: str
    schedule: PruningSchedule
    structure: Structure
    in_global_group: bool


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    schedule: PruningSchedule
    structure: Structure = Structure()
    scope: str = "layer"
    rules: tuple[Rule, ...] = ()

    def __post_init__(self):
        if not isinstance(self.schedule, PruningSchedule):
            raise ScheduleError(
                f"schedule must be graphprune.PolynomialDecay or ConstantSparsity, got {type(self.schedule).__name__}"
            )
        if self.scope not in SCOPES:
            raise ScheduleError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if not isinstance(self.structure, Structure):
            raise StructureError(f"structure must be a graphprune.Structure, got {type(self.structure).__name__}")
        if isinstance(self.rules, (str, Rule)) or not hasattr(self.rules, "__iter__"):
            raise ScheduleError(f"rules must be a list of graphprune.Rule, got {self.rules!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ScheduleError(f"rules must be graphprune.Rule objects, got {rule!r} (write "
                                    f"graphprune.Rule({rule!r}, skip=True) or Rule(..., sparsity=0.5))")

    def check_rules_match(self, weights) -> None:
        """Refuse a rule that matches none of ``weights``: a typo in a pattern must not silently
        prune what it was meant to spare (or leave at its own sparsity)."""
        weights = list(weights)
        for rule in self.rules:
            if not any(rule.matches(w) for w in weights):
                names = [w.key for w in weights]
                shown = ", ".join(names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")
                raise ScheduleError(f"rule pattern {rule.pattern!r} (exclude / sparsity_for / Rule) matches no weight; "
                                    f"the weights are: {shown or 'none'}")

    def plan(self, weights: Iterable) -> tuple[dict[str, WeightPlan], dict[str, str]]:
        """(plans by weight key, skipped weight key -> reason). Structures are checked here."""
        plans, skipped = {}, {}
        for weight in weights:
            rule = next((r for r in self.rules if r.matches(weight)), None)
            if rule is not None and rule.skip:
                skipped[weight.key] = f"skipped by rule {rule.pattern!r}"
                continue
            schedule, structure, own = self.schedule, self.structure, False
            if rule is not None and rule.sparsity is not None:
                own = True
                schedule = (rule.sparsity if isinstance(rule.sparsity, PruningSchedule)
                            else self.schedule.with_final_sparsity(rule.sparsity))
            if rule is not None and rule.structure is not None:
                own, structure = True, rule.structure
            if own and (structure.channels or self.structure.channels):
                if structure != self.structure:
                    raise StructureError(f"rule {rule.pattern!r}: with structure='channel' a rule cannot change the "
                                         "structure (channels are removed from every weight of their group "
                                         "together); give it a sparsity or skip=True")
                if isinstance(rule.sparsity, PruningSchedule):
                    raise StructureError(f"rule {rule.pattern!r}: with structure='channel' a rule's sparsity must be a "
                                         "number (every group is updated at the config schedule's steps), not a "
                                         "schedule")
            structure.check(weight)
            in_global = self.scope == "global" and not own and structure.m_by_n is None
            plans[weight.key] = WeightPlan(weight.key, schedule, structure, in_global)
        return plans, skipped


def make_config(schedule=None, *, final_sparsity=None, initial_sparsity=0.0, begin_step=0, end_step=None,
                frequency=100, power=3, kind="polynomial", block_size=(1, 1), block_pooling="AVG", m_by_n=None,
                scope="layer", exclude=None, sparsity_for=(), rules=(), structure="element", importance="l2",
                round_to=1, residual_stream=False) -> PruningConfig:
    """A PruningConfig from flat settings (the CLI and the text pipeline use this)."""
    if schedule is None:
        if final_sparsity is None:
            raise ScheduleError("give a schedule or final_sparsity")
        if kind == "constant":
            schedule = ConstantSparsity(final_sparsity, begin_step, -1 if end_step is None else end_step, frequency)
        elif kind == "polynomial":
            if end_step is None:
                raise ScheduleError("a polynomial schedule needs end_step")
            schedule = PolynomialDecay(initial_sparsity, final_sparsity, begin_step, end_step, power, frequency)
        else:
            raise ScheduleError(f"schedule must be 'polynomial' or 'constant', got {kind!r}")
    all_rules = list(rules)
    if exclude:
        all_rules.insert(0, Rule(exclude, skip=True))
    for item in sparsity_for:
        pattern, sep, value = item.rpartition("=") if isinstance(item, str) else ("", "=", "")
        if isinstance(item, str):
            if not sep or not pattern:
                raise ScheduleError(f"sparsity_for must be REGEX=SPARSITY, got {item!r}")
            try:
                sparsity = float(value)
            except ValueError:
                raise ScheduleError(f"sparsity_for (--sparsity_for) {item!r}: {value!r} is not a number") from None
        else:
            pattern, sparsity = item
        try:
            all_rules.append(Rule(pattern, sparsity=sparsity))
        except ScheduleError as error:
            raise ScheduleError(f"sparsity_for (--sparsity_for) {item!r}: {error}") from None
    if isinstance(structure, Structure):
        return PruningConfig(schedule=schedule, structure=structure, scope=scope, rules=tuple(all_rules))
    structure = Structure(block_size=block_size, block_pooling=block_pooling, m_by_n=m_by_n,
                          kind="element" if structure in (None, "") else structure, importance=importance,
                          round_to=round_to, residual_stream=residual_stream)
    return PruningConfig(schedule=schedule, structure=structure, scope=scope, rules=tuple(all_rules))
