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


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp dir in ``path``'s parent; on success it becomes ``path``."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _replace(temp, path, is_dir=True)


@contextlib.contextmanager
def atomic_file(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp file path beside ``path``; on success it is renamed to ``path``."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    os.close(handle)
    try:
        yield temp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    _replace(temp, path, is_dir=False)


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
    os.rename(temp, path)
    if os.path.isdir(backup):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.remove(backup)
