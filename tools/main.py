"""graphprune COMMAND [--flags]: the console script; each command is an absl program.

Only the chosen command's module is imported, so each command defines just its own flags.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

COMMANDS = {
    "prune": "Rewrite a SavedModel into a prunable SavedModel (masks, schedule, step).",
    "train": "Fine-tune a prunable SavedModel on arrays from an .npz, updating masks every step.",
    "finalize": "Fold masks, strip the pruning machinery, export SavedModel (and TFLite).",
    "export": "Convert a finalized SavedModel to TFLite (one or several variants) without finalizing again.",
    "inspect": "Table of prunable weights of any SavedModel or .tflite (--json for scripts).",
    "run": "Run any registered pass list on a SavedModel (--list shows the registry).",
    "demo": "Classic MNIST CNN: train, prune to 90%, finalize, TFLite; accuracy and sizes.",
}


def usage() -> str:
    lines = ["usage: graphprune COMMAND [--flags] [--flagfile=FILE]", "", "commands:"]
    lines += [f"  {name:9s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "graphprune COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def run(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"graphprune: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    os.environ["GRAPHPRUNE_COMMAND"] = f"graphprune {command}"
    try:
        _run_command(command, argv[2:])
    except KeyboardInterrupt:  # Ctrl-C while TensorFlow is imported or flags are parsed
        from graphprune.tools import common

        common.fail(common.interrupted_message(), code=130)
    except BrokenPipeError:  # `graphprune inspect ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    finally:
        # The command is done (or has failed and said so): a Ctrl-C during interpreter shutdown
        # must not kill it with a signal and no word.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_command(command, arguments):
    from graphprune.tools import common

    common.record_interrupts()
    common.quiet_tensorflow(verbose=any(a in ("--verbose", "-verbose") for a in arguments))
    module = importlib.import_module(f"graphprune.tools.{command}")
    if any(a in common.HELP_ARGUMENTS for a in arguments):
        print(common.command_help(module))
        sys.exit(0)
    from absl import app

    app.run(common.run_main(module.main), argv=[f"graphprune {command}"] + arguments,
            flags_parser=common.parse_flags)


if __name__ == "__main__":
    run()
