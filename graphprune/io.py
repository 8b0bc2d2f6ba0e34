"""Atomic outputs: write into a temp dir (or file) beside the target, then rename into place.

An interrupted run leaves no partial output; an existing output is replaced only with
``overwrite`` and only once the new one is complete; an output inside an input is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from graphprune.errors import OutputExistsError


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(path: str, *, overwrite: bool = False, inputs=()) -> str:
    path = os.path.abspath(os.fspath(path))
    for source in inputs:
        if source is not None and isinstance(source, (str, os.PathLike)) and _inside(path, os.fspath(source)):
            raise OutputExistsError(f"{path}: the output lies inside the input {os.fspath(source)}; write it elsewhere")
        if source is not None and isinstance(source, (str, os.PathLike)) and _inside(os.fspath(source), path):
            raise OutputExistsError(f"{path}: the output would contain or replace the input {os.fspath(source)}")
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    return path


def _partial_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.partial-"


def remove_stale_partials(path: str) -> list[str]:
    """Remove temp outputs for ``path`` left by runs that were killed (their pid is gone)."""
    parent, prefix, removed = os.path.dirname(path), _partial_prefix(path), []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            full = os.path.join(parent, name)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            removed.append(full)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp dir in ``path``'s parent; on success it becomes ``path``.

    The temp dir is named '.<name>.partial-<pid>-<random>': an interrupted run (even SIGKILL) never
    leaves anything at ``path``, and the next run for the same path removes what it left."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(path)
    temp = tempfile.mkdtemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-", dir=parent)
    try:
        yield temp
        _replace(temp, path, is_dir=True)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp file path beside ``path``; on success it is renamed to ``path``."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(path)
    handle, temp = tempfile.mkstemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-", dir=parent)
    os.close(handle)
    try:
        yield temp
        _replace(temp, path, is_dir=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


def _replace(temp: str, path: str, *, is_dir: bool) -> None:
    if not os.path.lexists(path):
        os.rename(temp, path)
        return
    if not is_dir and not os.path.isdir(path):
        os.replace(temp, path)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rmdir(backup)
    os.rename(path, backup)
    try:
        os.rename(temp, path)
    except BaseException:
        os.rename(backup, path)  # interrupted between the two renames: the old output comes back
        raise
    if os.path.isdir(backup):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.remove(backup)
