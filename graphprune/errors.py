"""The error taxonomy: every refusal is a GraphPruneError with a one-line, actionable message.

Tools map GraphPruneError to exit code 2 and print only the message (a traceback only with
--verbose). Anything else escaping the library is a bug. Errors about a value the caller gave
(a sparsity, a step, a structure, a path, data) also subclass ValueError, as the reference
toolkit's do, so code that catches ValueError keeps working.
"""


class GraphPruneError(Exception):
    """Base class: the message names the thing that is wrong and what to do about it."""


class BadModelError(GraphPruneError):
    """The input is not a model we can read (missing dir, broken SavedModel, no signature)."""


class NoPrunableWeightsError(GraphPruneError):
    """The model has no weight read by a prunable op (MatMul, Conv, Einsum, ...)."""


class UnsupportedError(GraphPruneError):
    """An op, dtype or structure we do not handle."""


class ScheduleError(GraphPruneError, ValueError):
    """A pruning schedule (or rule) with invalid settings."""


class StructureError(GraphPruneError, ValueError):
    """A block or M:N structure that does not fit a weight."""


class OutputExistsError(GraphPruneError, ValueError):
    """The output path exists and overwrite was not asked for, lies inside the input, collides
    with another output of the same call, or is a path no output may take (blank, '/', ...)."""


class WriteError(GraphPruneError):
    """An output could not be written (full disk, no permission, a file where a directory must be)."""


class DataError(GraphPruneError, ValueError):
    """Training data that does not fit the model (shape, dtype, labels, non-finite values), or
    training that diverged (a NaN loss, non-finite weights at a mask update)."""


class OpLibraryError(GraphPruneError):
    """An op library asked for (--op_library) that is neither an installed module nor a loadable
    compiled library."""


class PassError(GraphPruneError):
    """A pass failed or left an invalid graph; the message names it and the passes before it."""


class MissingTensorFlowError(GraphPruneError, ImportError):
    """TensorFlow is not installed: graphprune leaves the distribution to the user."""


NO_TENSORFLOW = ("graphprune needs TensorFlow 2.16 or newer, and none is installed: pip install "
                 "'graphprune[tensorflow]' (or 'graphprune[tensorflow-cpu]', or the TensorFlow build you use)")


def first_line(error: Exception, limit: int = 300) -> str:
    """An error's first line, at most ``limit`` characters, for a one-line message (TensorFlow's
    errors add a graph's stack traces; its OpErrors keep the text itself in ``message``). Where
    TensorFlow's first line only says "Graph execution error:", the line that says what went
    wrong, after the node's stack trace, follows it: "Graph execution error: indices[0] = -1 ..."."""
    text = (getattr(error, "message", None) or str(error)).strip()
    lines = text.splitlines() or [type(error).__name__]
    if lines[0].strip() == "Graph execution error:":
        detail = next((line.strip() for line in lines[1:] if line.strip() and not line[0].isspace()
                       and not line.startswith(("Detected at node", "<stack traces unavailable>"))), None)
        if detail:
            return f"{lines[0].strip()} {detail}"[:limit]
    return lines[0][:limit]
