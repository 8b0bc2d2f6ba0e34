"""What every graphprune command shares: flag-error handling, library-error handling, output.

Every failure is one line on stderr: a GraphPruneError (bad input, exit 2), Ctrl-C ("interrupted;
nothing was written", exit 130), and even a bug (exit 1, "internal error ... --verbose"); the
traceback only with --verbose.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags

FLAGS = flags.FLAGS

_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the full traceback on errors and TensorFlow's own messages.")
_OP_LIBRARY = flags.DEFINE_multi_string(
    "op_library", [], "A library defining ops the model uses, loaded first: a compiled one's path (.so) or an "
    "installed module that registers its ops on import; repeat for several (tensorflow_text is imported by itself).")

HELP_ARGUMENTS = ("--help", "-help", "-h", "--helpshort", "-helpshort")


def command_name() -> str:
    return os.environ.get("GRAPHPRUNE_COMMAND", "graphprune")


def verbose() -> bool:
    return bool(_VERBOSE.present and _VERBOSE.value) if FLAGS.is_parsed() else "--verbose" in sys.argv


def progress():
    """With --verbose, a reporter that prints each stage's line (time, peak memory) on stderr."""
    if not verbose():
        return None
    return lambda line: print(f"{command_name()} {line}", file=sys.stderr, flush=True)


def stages(command: str):
    """``with stages("prune")("save"):`` reports the stage under --verbose (graphprune.progress)."""
    from graphprune.progress import Stages

    return Stages(command, progress())


def fail(message: str, code: int = 2):
    """One line on stderr, then exit (2: bad input or flags)."""
    print(f"{command_name()}: error: {message}", file=sys.stderr)
    sys.exit(code)


def flops_at(size) -> str:
    """How FLOPs were counted: 'FLOPs at batch 1', with the size given to unknown dimensions."""
    return f"FLOPs at batch 1, unknown dimensions {size}" if size else "FLOPs at batch 1"


def uncounted(cost) -> str:
    """What a Cost could not count, said with how to count it ('' when it counted everything)."""
    if not cost.uncounted:
        return ""
    return (f"; {cost.uncounted} convolutions or matrix products of unknown size count no FLOPs "
            "(--unknown_size=N counts them)")


def parse_flags(argv):
    """absl flags parser that turns a bad flag into one line and exit code 2 (absl exits 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}; see {command_name()} --help")


def command_help(module) -> str:
    """The command's docstring and its own flags (plus --verbose and --flagfile)."""
    doc = (module.__doc__ or "").strip()
    own = []
    for source in (*getattr(module, "HELP_MODULES", ()), module):
        own += FLAGS.module_help(source).strip().splitlines()[1:]  # drop the module-name header
    shared = FLAGS.module_help(sys.modules[__name__]).strip().splitlines()[1:]
    lines = [doc, "", "flags:", *own, *shared, "  --flagfile: read flags from this file, one per line."]
    return "\n".join(lines)


_INTERRUPTED = []  # set once a Ctrl-C has arrived (see record_interrupts)


def record_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered: TensorFlow sometimes turns the
    KeyboardInterrupt into another error on its way out of C++ ("pybind11::error_already_set:
    MISMATCH ... REPLACED BY KeyboardInterrupt", raised as a RuntimeError), which must still read
    as the interruption, not as an internal error. Left alone where SIGINT is ignored."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def interrupt(signum, frame):
        _INTERRUPTED.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def interrupted_message() -> str:
    """What a Ctrl-C left: nothing, or the outputs published before it."""
    from graphprune import io

    if not io.PUBLISHED:
        return "interrupted; nothing was written"
    return f"interrupted after writing {', '.join(io.PUBLISHED)} (complete); nothing else was written"


def run_main(main):
    """Wrap a command's main so that every way out is one line (see the module docstring)."""

    def wrapped(argv):
        from graphprune.errors import GraphPruneError

        try:
            if FLAGS.is_parsed() and _OP_LIBRARY.value:
                from graphprune.load import load_op_libraries

                load_op_libraries(_OP_LIBRARY.value)
            return main(argv)
        except GraphPruneError as error:
            if verbose():
                traceback.print_exc()
            fail(str(error))
        except KeyboardInterrupt:
            fail(interrupted_message(), code=130)
        except ModuleNotFoundError as error:
            if error.name != "tensorflow" and not (error.name or "").startswith("tensorflow."):
                raise
            from graphprune.errors import NO_TENSORFLOW

            fail(NO_TENSORFLOW)
        except (SystemExit, GeneratorExit, BrokenPipeError):
            raise
        except Exception as error:  # a bug: still one line, the traceback with --verbose
            if verbose():
                traceback.print_exc()
            if _INTERRUPTED:  # the Ctrl-C, in another error's clothes
                fail(interrupted_message(), code=130)
            first = (str(error).strip().splitlines() or [""])[0][:300]
            fail(f"internal error: {type(error).__name__}: {first} (rerun with --verbose for the traceback, and "
                 "please report it)", code=1)

    return wrapped


def quiet_tensorflow(verbose: bool = False):
    """Keep TensorFlow's C++ start-up and converter chatter off the terminal.

    TF 2.21 writes it straight to file descriptor 2 whatever TF_CPP_MIN_LOG_LEVEL says, so fd 2
    goes to /dev/null and Python's sys.stderr (our messages, progress) keeps the real stderr.
    --verbose leaves everything as it is."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not verbose:
        sys.stderr.flush()
        real_stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(real_stderr, "w", buffering=1)
    import logging
    import warnings

    import absl.logging

    # Without --verbose, TensorFlow's own log lines (a garbage fingerprint.pb logs an error with a
    # traceback, then loads fine) stay hidden; our messages are print()s and warnings.
    level = logging.INFO if verbose else logging.CRITICAL
    logging.getLogger("tensorflow").setLevel(level)
    absl.logging.set_verbosity(absl.logging.INFO if verbose else absl.logging.FATAL)
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as 'graphprune COMMAND: warning: ...' lines (no file:line and source echo)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    if text.startswith("graphprune: "):
        text = text[len("graphprune: "):]
    print(f"{command_name()}: warning: {text}", file=file or sys.stderr)
