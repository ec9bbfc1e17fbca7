"""The one output-path policy, and the atomic writers every command and library writer uses.

What trine promises about what it writes (the README's "Safety" section):

- An output is never an input, the working folder, or a folder holding either (compared as
  resolved real paths), and never a symbolic link (give the real path).
- A folder output appears whole or not at all: it is written into a temp folder beside the target
  and swapped in by one rename. A folder trine wrote carries a marker file (:data:`MARKER`);
  replacing an existing, non-empty folder needs ``overwrite`` (``--overwrite``), and a non-empty
  folder without the marker (one trine did not write) is never replaced.
- A file output is written beside its target and renamed over it at the end.
- Two writers finishing into one target take turns (a lock on the parent folder): the second
  either replaces the first (``overwrite``) or fails with a clear message; neither loses a
  finished result to the other. Temp folders of killed runs are removed by the next writer.
- Outputs get the normal permissions of the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any

from trine.errors import OutputPathError

MARKER = ".trine-output"
PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------ checks
def real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _within(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies inside it (both resolved)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (what a card or a manifest records of an input)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_trine_folder(path: PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def check_output_path(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    kind: str = "folder",
    what: str = "output",
) -> str:
    """Raise :class:`OutputPathError` unless ``path`` may be written; return it resolved.

    ``kind="folder"``: an existing non-empty folder must carry trine's marker and needs
    ``overwrite``. ``kind="file"``: an existing file is replaced (it was named as the output).
    """
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', not {kind!r}")
    shown = os.fspath(path)
    if not shown:
        raise OutputPathError(f"the {what} path is empty")
    if os.path.islink(os.path.abspath(shown)):
        raise OutputPathError(f"{shown}: the {what} is a symbolic link; give the real path")
    target = real(shown)
    cwd = real(os.getcwd())
    if _within(cwd, target):
        raise OutputPathError(f"{shown}: the {what} is the working folder or contains it; choose a new folder")
    for inp in inputs:
        if inp is None or not os.path.exists(os.fspath(inp)):
            continue
        source = real(inp)
        if source == target:
            raise OutputPathError(f"{shown}: the {what} would replace the input {os.fspath(inp)}; choose another path")
        if _within(source, target):
            raise OutputPathError(f"{shown}: the {what} contains the input {os.fspath(inp)}; choose another path")
    if kind == "file":
        if os.path.isdir(target):
            raise OutputPathError(f"{shown}: the {what} is a folder; give a file name")
        return target
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise OutputPathError(f"{shown}: the {what} exists and is not a folder")
        if os.listdir(target):
            if not is_trine_folder(target):
                raise OutputPathError(f"{shown}: the {what} is a non-empty folder trine did not write; it is never "
                                      "replaced (choose a new folder, or empty it yourself)")
            if not overwrite:
                raise OutputPathError(f"{shown}: the {what} exists (written by trine earlier); pass --overwrite "
                                      "(overwrite=True) to replace it")
    return target


def check_distinct(paths: dict[str, PathLike | None]) -> None:
    """Two outputs of one command may not be the same file (``{"output_file": p, "dropped_file": q}``)."""
    seen: dict[str, str] = {}
    for name, p in paths.items():
        if p is None:
            continue
        r = real(p)
        if r in seen:
            raise OutputPathError(f"{os.fspath(p)}: {name} and {seen[r]} are the same file; give two paths")
        seen[r] = name


# ------------------------------------------------------------------------------------- primitives
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(path: PathLike, *, folder: bool) -> None:
    """The permissions a plain ``open``/``mkdir`` would give (temp files start private)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def open_private_files(folder: str) -> None:
    """Give files and folders that a library wrote private (some write through their own temp
    file: ``model.safetensors`` arrives 0600) the umask's permissions; others are left as they are."""
    for root, dirs, files in os.walk(folder):
        for name, is_dir in [(d, True) for d in dirs] + [(f, False) for f in files]:
            full = os.path.join(root, name)
            if not os.path.islink(full) and stat.S_IMODE(os.stat(full).st_mode) & 0o077 == 0:
                normal_mode(full, folder=is_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: str, name: str) -> None:
    """Remove ``.tmp-<name>-<pid>-*`` leftovers of writers that were killed (their process is gone)."""
    pattern = re.compile(re.escape(f".tmp-{name}-") + r"(\d+)-[A-Za-z0-9_]+$")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(parent):
            m = pattern.match(entry)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid != os.getpid() and not _pid_alive(pid):
                full = os.path.join(parent, entry)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(full)


def temp_prefix(path: str) -> str:
    """The name start of a writer's temp beside ``path`` (its pid inside: :func:`remove_stale_temps`)."""
    return f".tmp-{os.path.basename(path)}-{os.getpid()}-"


@contextlib.contextmanager
def parent_lock(path: str) -> Iterator[None]:
    """An exclusive lock on the folder that holds ``path`` (so two writers swap in turn)."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def exchange(new: str, target: str) -> None:
    """Put folder ``new`` at ``target``; afterwards ``new`` holds the old content (the caller removes it).
    Atomic where the kernel can swap two paths; otherwise two renames in a row."""
    if _renameat2_exchange(new, target):
        return
    aside = tempfile.mkdtemp(prefix=".old-" + os.path.basename(target) + "-", dir=os.path.dirname(target))
    os.rmdir(aside)
    os.replace(target, aside)
    os.replace(new, target)
    os.replace(aside, new)


def write_marker(folder: str, **info: Any) -> None:
    info = {"written_by": "trine", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(info, f)


def link_tree(src: str, dst: str) -> None:
    """Copy a file or folder as hard links (no data copied; a plain copy across file systems)."""
    def _link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=_link, symlinks=True)
    else:
        _link(src, dst)


# ---------------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def atomic_folder(
    path: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    if_exists: str = "error",
    carry_over: Sequence[str] = (),
) -> Iterator[str]:
    """Yield a temp folder beside ``path``; on success it becomes ``path`` whole (marker added), on
    error it is removed and ``path`` is untouched.

    ``if_exists``: ``"error"`` (replace an existing trine folder only with ``overwrite``) or
    ``"keep"`` (a content-addressed entry such as a cache: if another writer finished first, keep
    theirs and drop ours). ``carry_over``: name patterns of the old folder's entries (e.g.
    ``checkpoint-*``) carried into the new one as hard links.
    """
    if if_exists not in ("error", "keep"):
        raise ValueError(f"if_exists must be 'error' or 'keep', not {if_exists!r}")
    inputs = list(inputs)
    shown = os.fspath(path)
    if if_exists == "keep" and is_trine_folder(shown):
        check_output_path(shown, inputs=inputs, overwrite=True)
    else:
        check_output_path(shown, inputs=inputs, overwrite=overwrite)
    target = os.path.abspath(shown)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, os.path.basename(target))
    tmp = tempfile.mkdtemp(prefix=temp_prefix(target), dir=parent)
    try:
        normal_mode(tmp, folder=True)
        yield tmp
        write_marker(tmp)
        open_private_files(tmp)
        with parent_lock(target):
            if os.path.lexists(target):
                if if_exists == "keep" and is_trine_folder(target):
                    shutil.rmtree(tmp)
                    return
                # re-checked under the lock: another writer may have finished here meanwhile
                check_output_path(shown, inputs=inputs, overwrite=overwrite)
                for entry in os.listdir(target) if carry_over else ():
                    if any(fnmatch.fnmatch(entry, p) for p in carry_over) and not os.path.lexists(
                            os.path.join(tmp, entry)):
                        link_tree(os.path.join(target, entry), os.path.join(tmp, entry))
                exchange(tmp, target)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(path: PathLike, write: Callable[[str], None], *, atomic: bool = True,
                 overwrite: bool = False, inputs: Iterable[PathLike | None] = ()) -> None:
    """``write(folder)`` into ``path``. ``atomic``: the folder appears whole or not at all, under the
    output policy (:func:`atomic_folder`). ``atomic=False`` writes in place: only for folders a
    caller already staged (a trainer's checkpoint being written)."""
    if not atomic:
        os.makedirs(path, exist_ok=True)
        write(os.fspath(path))
        return
    with atomic_folder(path, overwrite=overwrite, inputs=inputs) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", *, inputs: Iterable[PathLike | None] = (),
                what: str = "output file", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """A handle on a temp file beside ``path``; it becomes ``path`` (normal permissions) only if the
    block succeeds. ``path`` may not be an input (nor the same file by another path) or a link."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    check_output_path(path, inputs=inputs, kind="file", what=what)
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(parent, os.path.basename(target))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), dir=parent)
    try:
        normal_mode(tmp, folder=False)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
