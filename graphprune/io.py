"""Outputs that lose nothing: checked paths, temp dirs beside the target, an exclusive publish.

- A path no output may take is refused before any work: blank, '/', the home or the current
  directory or an ancestor of them, an input or anything inside or above an input, a path under a
  regular file or a dangling link, a directory the user cannot write.
- Everything is written into '.<name>.partial-<pid>-<random>' beside the target and renamed into
  place only when complete, so an interrupted run (even SIGKILL) leaves nothing at the target; the
  next run for the same target removes what a dead run left and says so on stderr.
- The publishing rename is exclusive (renameat2 RENAME_NOREPLACE, or an equivalent): a name that
  was taken while the run worked is never replaced without ``overwrite``; the finished result is
  then kept under a name the error prints. With ``overwrite`` the old output is moved aside to
  '.<name>.old-<pid>-<random>', the new one renamed in, the old one removed; a run killed between
  those two renames is repaired by the next one (the old output is restored, or the leftover
  removed, whichever is right, and stderr says which).
- Outputs get the permissions the user's umask gives any new file (not mkdtemp's 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import time

from graphprune.errors import OutputExistsError, WriteError


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _protected_places() -> list[tuple[str, str]]:
    places = [(os.sep, "the root directory")]
    with contextlib.suppress(OSError):
        places.append((os.getcwd(), "the current directory"))
    home = os.path.expanduser("~")
    if home and home != "~":
        places.append((home, "your home directory"))
    return places


def check_output(path, *, overwrite: bool = False, inputs=()) -> str:
    """The absolute output path, or an OutputExistsError / WriteError saying why it cannot be one.

    Nothing is created here; what dead runs left beside the path is repaired first (recover_stale),
    so that an output an interrupted overwrite hid is back, and counts as existing, before any work."""
    raw = "" if path is None else os.fspath(path)
    if not str(raw).strip():
        raise OutputExistsError(f"the output path is empty ({raw!r}); name a new directory or file "
                                "(an unset shell variable?)")
    path = os.path.abspath(raw)
    for place, what in _protected_places():
        if _inside(place, path):
            where = "is" if os.path.realpath(place) == os.path.realpath(path) else "contains"
            raise OutputExistsError(f"{raw}: refusing to write there: it {where} {what} ({place}); "
                                    "name a new directory")
    for source in inputs:
        if source is None or not isinstance(source, (str, os.PathLike)):
            continue
        source = os.fspath(source)
        if _inside(path, source):
            raise OutputExistsError(f"{path}: the output lies inside the input {source}; write it elsewhere")
        if _inside(source, path):
            raise OutputExistsError(f"{path}: the output would contain or replace the input {source}")
    if os.path.islink(path) and not os.path.exists(path):
        raise OutputExistsError(f"{path} is a dangling symbolic link (to {os.readlink(path)}); "
                                "remove it or name another output")
    _check_parent(path)
    recover_stale(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    return path


def check_distinct_outputs(paths) -> None:
    """Refuse two outputs of one call that are the same path or lie one inside the other."""
    given = [(os.fspath(p), os.path.abspath(os.fspath(p))) for p in paths if p is not None and str(p).strip()]
    for i, (raw_a, a) in enumerate(given):
        for raw_b, b in given[i + 1:]:
            if _inside(a, b) or _inside(b, a):
                how = "are the same path" if os.path.realpath(a) == os.path.realpath(b) else "lie one inside the other"
                raise OutputExistsError(f"outputs {raw_a} and {raw_b} {how}; give each output its own path")


def _check_parent(path: str) -> None:
    """The nearest existing ancestor must be a directory the user can write into."""
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        if os.path.islink(parent):
            raise WriteError(f"cannot create {path}: {parent} is a dangling symbolic link (to {os.readlink(parent)})")
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WriteError(f"cannot create {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"cannot create {path}: no permission to write in {parent}")


def _partial_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.partial-"


def _old_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.old-"


def _tell(message: str) -> None:
    print(f"graphprune: {message}", file=sys.stderr)


def recover_stale(path: str) -> list[str]:
    """Repair what runs that died (their pid is gone) left beside ``path``; returns the messages
    (also printed on stderr).

    '.<name>.partial-*' is an unfinished output: removed. '.<name>.old-*' is an output moved aside
    by an overwrite that died before its end: restored if ``path`` is missing (the new output never
    arrived), else removed (the new output is complete)."""
    parent, messages = os.path.dirname(path), []
    if not os.path.isdir(parent):
        return messages
    for name in sorted(os.listdir(parent)):
        for prefix in (_partial_prefix(path), _old_prefix(path)):
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            full = os.path.join(parent, name)
            if prefix == _old_prefix(path) and not os.path.lexists(path):
                os.rename(full, path)
                messages.append(f"restored {path} from {full}, left by an interrupted overwrite")
            else:
                _remove(full)
                what = "an interrupted run" if prefix == _partial_prefix(path) else "an interrupted overwrite"
                messages.append(f"removed {full}, left by {what}")
    for message in messages:
        _tell(message)
    return messages


remove_stale_partials = recover_stale  # the name earlier releases exported


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(error: BaseException, path: str):
    """A WriteError for a failure to write ``path`` (full disk, permissions, read-only), or None."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        return WriteError(f"cannot write {path}: {reason}" + (" (free some space and run again)"
                                                             if error.errno == errno.ENOSPC else ""))
    message = str(error)
    module = type(error).__module__ or ""
    if module.startswith("tensorflow"):
        for marker, reason, hint in (("No space left", "No space left on device", " (free some space and run again)"),
                                     ("Read-only file system", "Read-only file system", ""),
                                     ("Permission denied", "Permission denied", ""),
                                     ("quota exceeded", "Disk quota exceeded", "")):
            if marker in message:
                return WriteError(f"cannot write {path}: {reason}{hint}")
    return None


@contextlib.contextmanager
def _writing(path: str):
    try:
        yield
    except (OSError, Exception) as error:  # noqa: B014 - TF's write errors are not OSErrors
        converted = _write_error(error, path)
        if converted is None:
            raise
        raise converted from error


def _make_parent(path: str) -> str:
    parent = os.path.dirname(path)
    with _writing(path):
        os.makedirs(parent, exist_ok=True)
    return parent


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp dir in ``path``'s parent; on success it becomes ``path`` (see module doc)."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = _make_parent(path)
    with _writing(path):
        temp = tempfile.mkdtemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-", dir=parent)
        os.chmod(temp, 0o777 & ~_umask())
    try:
        with _writing(path):
            yield temp
            _publish(temp, path, overwrite=overwrite, is_dir=True)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        _remove(temp)
        raise


@contextlib.contextmanager
def atomic_file(path, *, overwrite: bool = False, inputs=()):
    """Yield a temp file path beside ``path``; on success it is renamed to ``path``."""
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    parent = _make_parent(path)
    with _writing(path):
        handle, temp = tempfile.mkstemp(prefix=f"{_partial_prefix(path)}{os.getpid()}-", dir=parent)
        os.close(handle)
        os.chmod(temp, 0o666 & ~_umask())
    try:
        with _writing(path):
            yield temp
            _publish(temp, path, overwrite=overwrite, is_dir=False)
    except BaseException:
        _remove(temp)
        raise


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()


def rename_noreplace(source: str, target: str, *, is_dir: bool) -> bool:
    """Rename ``source`` to ``target`` only if ``target`` does not exist; False if it does.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it; else an exclusive
    mkdir (directories: rename then replaces only that empty directory) or link (files)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), target)
    if is_dir:
        try:
            os.mkdir(target)
        except FileExistsError:
            return False
        try:
            os.rename(source, target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False  # someone wrote into the placeholder: theirs now
            os.rmdir(target)
            raise
        return True
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    os.remove(source)
    return True


def _keep(temp: str, path: str) -> str:
    kept = f"{path}.graphprune-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(temp, kept)
    return kept


def _taken(temp: str, path: str) -> OutputExistsError:
    kept = _keep(temp, path)
    return OutputExistsError(f"{path} appeared while graphprune was working and was left as it is; the result "
                             f"was kept at {kept} (pass --overwrite to replace {path})")


PUBLISHED: list[str] = []  # outputs this process completed, for what an interrupted command says


def _publish(temp: str, path: str, *, overwrite: bool, is_dir: bool) -> None:
    """Move the finished ``temp`` to ``path``, never destroying anything not checked (module doc)."""
    _move_into_place(temp, path, overwrite=overwrite, is_dir=is_dir)
    PUBLISHED.append(path)


def _move_into_place(temp: str, path: str, *, overwrite: bool, is_dir: bool) -> None:
    if rename_noreplace(temp, path, is_dir=is_dir):
        return
    if not overwrite:
        raise _taken(temp, path)
    if not is_dir and not os.path.isdir(path):
        os.replace(temp, path)  # atomic for files
        return
    backup = tempfile.mkdtemp(prefix=f"{_old_prefix(path)}{os.getpid()}-", dir=os.path.dirname(path))
    os.rmdir(backup)
    os.rename(path, backup)
    try:
        published = rename_noreplace(temp, path, is_dir=is_dir)
    except BaseException:
        os.rename(backup, path)  # interrupted between the two renames: the old output comes back
        raise
    _remove(backup)
    if not published:  # a third writer took the name between the two renames
        raise _taken(temp, path)
