"""Where tools write: output paths checked before any work starts, and files and folders
replaced whole, so a bad `--out` never throws finished work away and a kill -9 mid-write
leaves the old output or the new one, never a mixture.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator

from rig_jax.errors import ConfigError

_STAGING = ".staging-"          # prefix of the hidden siblings a write is staged in


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_creatable(path: str, field: str) -> None:
    """`path` can be created: its nearest existing ancestor is a folder this process may write."""
    base = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(base):
        raise ConfigError(f"{field}={path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={path}: {base} is not writable")


def check_output_folder(path: str, field: str, *, overwrite: bool = False,
                        allow_existing: bool = False) -> None:
    """Refuse, before any work, an output folder that cannot be written: a file in its place, an
    unwritable parent, or (unless `overwrite` or `allow_existing`) a folder that already holds
    files. `field` names the flag or config key in the error."""
    if not path:
        raise ConfigError(f"{field}: no output folder given")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{field}={path}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}={path}: folder is not writable")
        if os.listdir(path) and not (overwrite or allow_existing):
            raise ConfigError(f"{field}={path}: folder is not empty (pass --overwrite to replace it)")
        # replacing it whole writes a sibling, so the parent must be writable too
        if overwrite:
            _check_creatable(path, field)
        return
    _check_creatable(path, field)


def check_output_file(path: str, field: str, *, overwrite: bool = True) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if not path:
        raise ConfigError(f"{field}: no output file given")
    if os.path.isdir(path):
        raise ConfigError(f"{field}={path}: is a folder, not a file")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{field}={path}: file exists (pass --overwrite to replace it)")
    _check_creatable(path, field)


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in_folder(new: str, folder: str) -> None:
    """Replaces `folder` by the finished folder `new` (a sibling) in whole. Where the system can
    (Linux renameat2), the two are exchanged in one atomic step and the old one, now at `new`,
    removed: a kill at any instant leaves the old folder or the new one at `folder`. Elsewhere
    the old one is moved aside first, leaving a short window with no folder at `folder`."""
    if os.path.isdir(folder) and exchange_paths(new, folder):
        shutil.rmtree(new, ignore_errors=True)
        return
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(path: str) -> None:
    """Delete staging siblings of `path` that a killed run left behind (they are hidden and
    never loaded, only space)."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{_STAGING}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def replace_folder(path: str) -> Iterator[str]:
    """Yield a fresh hidden sibling folder to write into; on success it takes `path`'s place in
    one atomic step (the old folder, if any, is then deleted). On an exception or a kill the
    old folder stays as it was."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(path)
    staging = tempfile.mkdtemp(prefix=f".{name}{_STAGING}", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)        # a plain folder's mode once swapped in, not mkdtemp's 0700
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in_folder(staging, path)


@contextlib.contextmanager
def replace_file(path: str, mode: str = "w") -> Iterator[object]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path` atomically."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
