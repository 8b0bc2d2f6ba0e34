"""Pruning schedules built from TF ops: ``schedule(step) -> (should_prune, target_sparsity)``.

Semantics are the reference toolkit's (TF Model Optimization 0.8, see shared/REFERENCE.md):

    should_prune = step >= begin AND (step <= end OR end < 0) AND (step - begin) mod frequency == 0
    PolynomialDecay: p = clip((step - begin) / (end - begin), 0, 1) in float32,
                     sparsity = final + (initial - final) * (1 - p) ** power
"""

from __future__ import annotations

import math

import warnings

import numpy as np
import tensorflow as tf

from graphprune.errors import ScheduleError


class PruningSchedule:
    """Base class; subclasses define ``sparsity_at(step)`` (float32 tensor) and validation."""

    begin_step: int
    end_step: int
    frequency: int

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        return self.should_prune(step), self.sparsity_at(step)

    def should_prune(self, step):
        step = tf.cast(step, tf.int64)
        begin = tf.constant(self.begin_step, tf.int64)
        end = tf.constant(self.end_step, tf.int64)
        in_range = tf.logical_and(step >= begin, tf.logical_or(step <= end, end < 0))
        on_turn = tf.equal(tf.math.floormod(step - begin, tf.constant(self.frequency, tf.int64)), 0)
        return tf.logical_and(in_range, on_turn)

    @property
    def final_sparsity(self) -> float:
        raise NotImplementedError

    def with_final_sparsity(self, sparsity: float) -> "PruningSchedule":
        """The same schedule shape ending at another sparsity (per-weight overrides)."""
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"

    def _validate_steps(self, allow_open_end: bool):
        for name in ("begin_step", "end_step", "frequency"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ScheduleError(f"{name} must be an integer, got {value!r}")
            if not -1 <= int(value) <= INT64_MAX:
                raise ScheduleError(f"{name} must be at most {INT64_MAX} (int64: the step is an int64 variable), "
                                    f"got {value}")
            setattr(self, name, int(value))
        if self.begin_step < 0:
            raise ScheduleError(f"begin_step must be an integer >= 0, got {self.begin_step!r}")
        if self.end_step < 0 and not (allow_open_end and self.end_step == -1):
            hint = " (-1, prune forever, is only allowed for ConstantSparsity)" if not allow_open_end else ""
            raise ScheduleError(f"end_step must be >= begin_step{hint}, got {self.end_step}")
        if self.end_step != -1 and self.end_step < self.begin_step:
            raise ScheduleError(f"end_step ({self.end_step}) must be >= begin_step ({self.begin_step})")
        if not isinstance(self.frequency, (int, np.integer)) or self.frequency <= 0:
            raise ScheduleError(f"frequency must be an integer > 0, got {self.frequency!r}")

    def last_update_step(self) -> int | None:
        """The last step at which masks are updated (None for an open end)."""
        if self.end_step < 0:
            return None
        return self.begin_step + (self.end_step - self.begin_step) // self.frequency * self.frequency

    def _warn_if_final_unreached(self):
        last = self.last_update_step()
        if last is not None and last != self.end_step:
            reached = float(self.sparsity_at(tf.constant(last, tf.int64)))
            warnings.warn(
                f"{type(self).__name__}: end_step - begin_step ({self.end_step - self.begin_step}) is not a "
                f"multiple of frequency ({self.frequency}); the last update is at step {last} with sparsity "
                f"{reached:.6g}, not {self.final_sparsity} (the reference toolkit behaves the same)",
                stacklevel=3,
            )


INT64_MAX = 2**63 - 1


def _check_power(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ScheduleError(f"power must be a number >= 0, got {value!r}")
    try:
        finite = math.isfinite(value)  # math: NumPy's isfinite refuses ints past 64 bits
    except OverflowError:
        finite = False
    if not finite or value < 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ScheduleError(f"power must be a finite number >= 0, got {shown}")
    return value


def check_sparsity(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ScheduleError(f"{name} must be a number in [0, 1), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0 or np.isnan(value):
        raise ScheduleError(f"{name} must be in [0, 1), got {value}")
    return value


class ConstantSparsity(PruningSchedule):
    """Prune to ``target_sparsity`` every ``frequency`` steps from ``begin_step`` to ``end_step``
    (``end_step=-1``: forever)."""

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        self.target_sparsity = check_sparsity("target_sparsity", target_sparsity)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self._validate_steps(allow_open_end=True)

    def sparsity_at(self, step):
        return tf.constant(self.target_sparsity, tf.float32)

    @property
    def final_sparsity(self):
        return self.target_sparsity

    def with_final_sparsity(self, sparsity):
        return ConstantSparsity(sparsity, self.begin_step, self.end_step, self.frequency)

    def get_config(self):
        return {"target_sparsity": self.target_sparsity, "begin_step": int(self.begin_step),
                "end_step": int(self.end_step), "frequency": int(self.frequency)}


class PolynomialDecay(PruningSchedule):
    """Sparsity rises from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and
    ``end_step`` along ``final + (initial - final) * (1 - p) ** power``."""

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100):
        self.initial_sparsity = check_sparsity("initial_sparsity", initial_sparsity)
        self.final_sparsity_value = check_sparsity("final_sparsity", final_sparsity)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.power = _check_power(power)
        self._validate_steps(allow_open_end=False)
        self._warn_if_final_unreached()

    def sparsity_at(self, step):
        step = tf.cast(step, tf.int64)
        span = self.end_step - self.begin_step
        if span == 0:  # begin == end: the whole ramp happens at begin_step
            p = tf.cast(step >= self.begin_step, tf.float32)
        else:
            p = tf.cast(step - self.begin_step, tf.float32) / tf.constant(span, tf.float32)
            p = tf.minimum(1.0, tf.maximum(0.0, p))
        # The reference subtracts the Python floats (double) and rounds once (REFERENCE.md):
        # PolynomialDecay(0.45, 0.61, 1, 171, 2, 4) at step 1 is then 0.45000002, and 10 weights
        # keep 5, as there.
        span_sparsity = tf.constant(self.initial_sparsity - self.final_sparsity_value, tf.float32)
        final = tf.constant(self.final_sparsity_value, tf.float32)
        return span_sparsity * tf.pow(1.0 - p, tf.constant(self.power, tf.float32)) + final

    @property
    def final_sparsity(self):
        return self.final_sparsity_value

    def with_final_sparsity(self, sparsity):
        return PolynomialDecay(min(self.initial_sparsity, sparsity), sparsity, self.begin_step, self.end_step,
                               self.power, self.frequency)

    def get_config(self):
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity_value,
                "begin_step": int(self.begin_step), "end_step": int(self.end_step), "power": self.power,
                "frequency": int(self.frequency)}


def one_shot(sparsity: float) -> ConstantSparsity:
    """Prune once, at the first update (step 1), to ``sparsity``."""
    return ConstantSparsity(sparsity, begin_step=1, end_step=1, frequency=1)


def schedule_from_config(config: dict) -> PruningSchedule:
    kind = config.get("class")
    arguments = {k: v for k, v in config.items() if k != "class"}
    if kind == "PolynomialDecay":
        return PolynomialDecay(**arguments)
    if kind == "ConstantSparsity":
        return ConstantSparsity(**arguments)
    raise ScheduleError(f"unknown schedule class {kind!r}; use PolynomialDecay or ConstantSparsity")


def schedule_to_config(schedule: PruningSchedule) -> dict:
    return {"class": type(schedule).__name__, **schedule.get_config()}
