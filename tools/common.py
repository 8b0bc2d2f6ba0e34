"""What every graphprune command shares: flag-error handling, library-error handling, output."""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags

FLAGS = flags.FLAGS

_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the full traceback on errors.")


def command_name() -> str:
    return os.environ.get("GRAPHPRUNE_COMMAND", "graphprune")


def fail(message: str, code: int = 2):
    """One line on stderr, then exit (2: bad input or flags)."""
    print(f"{command_name()}: error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """absl flags parser that turns a bad flag into one line and exit code 2 (absl exits 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}; see --helpfull")


def call_library(function, *args, **kwargs):
    """Run a library call; a GraphPruneError becomes one line and exit code 2."""
    from graphprune.errors import GraphPruneError

    try:
        return function(*args, **kwargs)
    except GraphPruneError as error:
        if _VERBOSE.value:
            traceback.print_exc()
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", code=130)


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

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
