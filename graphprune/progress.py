"""One line per stage of a long command, with its time and the process's peak memory so far
(the CLI's --verbose; ``progress=`` in the API). Nothing is printed without a reporter."""

from __future__ import annotations

import contextlib
import resource
import sys
import time


def peak_rss_bytes() -> int:
    """The process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Stages:
    """``with stages("save"):`` reports 'finalize: save ...' before and 'finalize: save: 2.1 s,
    peak memory 3.40 GiB' after, through ``report`` (a callable taking a line), if given."""

    def __init__(self, command: str, report=None):
        self.command = command
        self.report = report

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.report is None:
            yield
            return
        self.report(f"{self.command}: {name} ...")
        started = time.perf_counter()
        yield
        self.report(f"{self.command}: {name}: {time.perf_counter() - started:.1f} s, "
                    f"peak memory {peak_rss_bytes() / 2**30:.2f} GiB")
