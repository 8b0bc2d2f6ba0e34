"""The error taxonomy: every refusal is a GraphPruneError with a one-line, actionable message.

Tools map GraphPruneError to exit code 2 and print only the message (a traceback only with
--verbose). Anything else escaping the library is a bug.
"""


class GraphPruneError(Exception):
    """Base class: the message names the thing that is wrong and what to do about it."""


class BadModelError(GraphPruneError):
    """The input is not a model we can read (missing dir, broken SavedModel, no signature)."""


class NoPrunableWeightsError(GraphPruneError):
    """The model has no weight read by a prunable op (MatMul, Conv, Einsum, ...)."""


class UnsupportedError(GraphPruneError):
    """An op, dtype or structure we do not handle."""


class ScheduleError(GraphPruneError):
    """A pruning schedule with invalid settings."""


class StructureError(GraphPruneError):
    """A block or M:N structure that does not fit a weight."""


class OutputExistsError(GraphPruneError):
    """The output path exists and overwrite was not asked for, or it lies inside the input."""


class PassError(GraphPruneError):
    """A pass failed or left an invalid graph; the message names it and the passes before it."""
