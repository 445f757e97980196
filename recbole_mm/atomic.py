"""Files that several processes may build at once, and that a killed process may leave half-written.

Every shared artefact of the package (image store, extracted features, saved dataset, embedded dataset, a
converter's output folder) follows the same three rules:

1. **One builder.** The build runs under :class:`BuildLock` (an exclusive inter-process lock from the
   ``filelock`` package: ``flock`` on Unix). The other processes wait, then find the result and use it.
   The kernel drops the lock of a process that dies, so a killed builder never blocks the next one; the lock
   file itself is removed when the lock is released, so a finished build leaves nothing behind.
2. **Atomic publication.** Files are written to a temporary name in the same folder and renamed into place
   (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_pickle`),
   so a reader sees the old file or the new one, never a partial one. Temporary names are
   ``.<final name>.tmp-<random>``: the builder of ``<final name>`` knows which leftovers are its own.
3. **Leftovers are reported.** Whatever a killed run left (temporary files, partial files it cannot resume, a
   stale lock file) is removed by the next builder of the same artefact, while it holds the lock (so it cannot
   be another process's work in progress), with one warning naming what was removed
   (:func:`remove_leftovers`).

Why the lock file is removed on release: ``filelock`` keeps it on Unix (so that waiters lock the same inode).
Removing it is safe with the usual protocol, which :class:`BuildLock` implements: the holder unlinks the file
*before* unlocking, and an acquirer that wakes up holding an inode that no longer has that name releases it and
tries again. (Some ``filelock`` releases already remove the file themselves; :func:`_filelock_removes_file`
detects that once per process, and then the holder leaves the removal to ``filelock``.)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import shutil
import tempfile
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


# ------------------------------------------------------------------------------------------------ atomic writes
def tmp_prefix(path: str) -> str:
    """Prefix of the temporary files of ``path``: ``.<basename>.tmp-`` (hidden, in the same folder)."""
    return "." + os.path.basename(path) + TMP_MARK


def tmp_pattern(path: str) -> str:
    """Glob pattern matching the temporary files of ``path`` (and nothing of another file)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), glob.escape(tmp_prefix(path)) + "*")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mkstemp_for(path: str, suffix: str = "") -> tuple[int, str]:
    """A temporary file beside ``path`` with the permissions a plain ``open`` would give (mkstemp makes 0600: other
    users of a shared dataset folder could not read the sidecars)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=tmp_prefix(path), suffix=suffix)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def temp_path_for(path: str, suffix: str = "") -> str:
    """A new empty temporary file for ``path`` (same folder, :func:`tmp_prefix` name); the caller renames it."""
    fd, tmp = _mkstemp_for(path, suffix)
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (readers never see a partial file)."""
    fd, tmp = _mkstemp_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _silent_remove(tmp)
        raise


def atomic_write_text(path: str, text: str, fsync: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str, obj: Any, fsync: bool = False, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **dump_kwargs), fsync=fsync)


def atomic_pickle(path: str, obj: Any) -> None:
    """Pickle ``obj`` into ``path`` atomically (streamed into the temporary file, then renamed)."""
    fd, tmp = _mkstemp_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        _silent_remove(tmp)
        raise


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``; ``None`` when it is missing or not valid JSON (e.g. written by an older, killed run)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _silent_remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------- leftovers
def remove_leftovers(paths: Iterable[str], what: str, log: Optional[logging.Logger] = None,
                     reason: str = "") -> list[str]:
    """Remove files / folders a killed run left behind; one warning naming them. Returns the removed paths.

    ``what`` names the build (``"image store build"``); ``reason`` (optional) says why they cannot be reused.
    Call it only while holding the :class:`BuildLock` of the artefact they belong to.
    """
    removed = []
    for path in sorted(set(paths)):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        folder = os.path.dirname(removed[0])
        names = ", ".join(os.path.basename(p) for p in removed)
        why = f" ({reason})" if reason else ""
        (log or logger).warning(f"removed what an interrupted {what} left in {folder}: {names}{why}")
    return removed


def leftover_temps(*paths: str) -> list[str]:
    """The temporary files (:func:`tmp_pattern`) of each of ``paths`` that exist."""
    found = []
    for p in paths:
        found += glob.glob(tmp_pattern(p))
    return found


# -------------------------------------------------------------------------------------------------- build lock
_REMOVES_FILE: Optional[bool] = None


def _filelock_removes_file() -> bool:
    """Whether this ``filelock`` release deletes the lock file on release (probed once per process)."""
    global _REMOVES_FILE
    if _REMOVES_FILE is None:
        import filelock

        probe_dir = tempfile.mkdtemp(prefix="recbole_mm-lockprobe-")
        try:
            path = os.path.join(probe_dir, "probe.lock")
            lock = filelock.FileLock(path)
            lock.acquire()
            lock.release()
            _REMOVES_FILE = not os.path.exists(path)
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
    return _REMOVES_FILE


def _locked_fd(lock) -> Optional[int]:
    """The descriptor ``filelock`` holds the lock through (``None`` if this release does not expose it)."""
    context = getattr(lock, "_context", None)
    fd = getattr(context, "lock_file_fd", None) if context is not None else None
    if fd is None:
        fd = getattr(lock, "_lock_file_fd", None)  # filelock < 3.10
    return fd if isinstance(fd, int) else None


def _names_locked_inode(path: str, fd: Optional[int]) -> bool:
    """Whether ``path`` still names the file locked through ``fd`` (it may have been removed and recreated)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    try:
        return os.path.samestat(st, os.fstat(fd))
    except OSError:
        return False


class BuildLock:
    """Exclusive inter-process lock for building one artefact (``filelock.FileLock`` underneath).

    Args:
        path: the lock file (created in its folder, removed on release).
        what: what is built, for the log messages (``"image store /x/16px"``).
        timeout: seconds to wait for another builder (``-1``: as long as it takes).
        log: logger for the messages (default: this module's).

    A lock file that exists although no process holds it (its builder was killed) is taken over, reported with a
    warning and removed on release. Not re-entrant: do not nest two ``BuildLock`` on the same path in one process.
    """

    def __init__(self, path: str, what: str = "", timeout: float = -1, log: Optional[logging.Logger] = None):
        self.path = os.path.abspath(path)
        self.what = what or os.path.basename(path)
        self.timeout = timeout
        self.log = log or logger
        self._lock = None

    def __enter__(self) -> "BuildLock":
        import filelock

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        existed = os.path.exists(self.path)
        waited = False
        while True:
            lock = filelock.FileLock(self.path)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                if not waited:
                    self.log.info(f"waiting for another process building {self.what} (lock {self.path})")
                waited = True
                lock.acquire(timeout=self.timeout)
            if _names_locked_inode(self.path, _locked_fd(lock)):
                break
            lock.release()  # we locked a file its holder had just removed: try again on the current one
        self._lock = lock
        if existed and not waited:
            self.log.warning(
                f"found a stale lock {self.path} (its process was killed; no process holds it): taken over, "
                f"removed when this build ends"
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        lock, self._lock = self._lock, None
        try:
            if not _filelock_removes_file() and _names_locked_inode(self.path, _locked_fd(lock)):
                if not getattr(getattr(lock, "_context", None), "soft_fallback", False):
                    os.remove(self.path)  # before unlocking: waiters on this inode then see it unlinked
        finally:
            lock.release()
        return False


def lock_path_for(path: str) -> str:
    """The lock file of the artefact ``path``: ``.<basename>.lock`` in the same folder (hidden)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".lock")


class FolderBuild:
    """Build the folder ``out_root/name`` atomically (rules 1-3 above, for a whole folder).

    ``with FolderBuild(out_root, name, what) as build:`` holds the lock ``out_root/.name.lock`` and removes what a
    killed build left (``.name.tmp-*``, ``.name.old-*``, reported). Inside, :meth:`tmp` makes the temporary
    folder to fill; leaving the block without an error renames it to ``out_root/name`` (an existing folder is moved
    aside first, then removed); an error removes it. A block that never calls :meth:`tmp` changes nothing (the
    existing folder was reused, or the build refused).
    """

    def __init__(self, out_root: str, name: str, what: str, log: Optional[logging.Logger] = None):
        self.out_root = os.path.abspath(out_root)
        self.name = name
        self.target = os.path.join(self.out_root, name)
        self.what = what
        self.log = log or logger
        self._tmp: Optional[str] = None
        self._lock: Optional[BuildLock] = None

    def __enter__(self) -> "FolderBuild":
        os.makedirs(self.out_root, exist_ok=True)
        self._lock = BuildLock(lock_path_for(self.target), what=self.what, log=self.log)
        self._lock.__enter__()
        try:
            stem = os.path.join(glob.escape(self.out_root), "." + glob.escape(self.name))
            remove_leftovers(glob.glob(stem + TMP_MARK + "*") + glob.glob(stem + ".old-*"), self.what, self.log)
        except BaseException:
            self._release()
            raise
        return self

    def tmp(self) -> str:
        """The temporary folder (made on the first call) that becomes ``target`` when the block ends well."""
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=tmp_prefix(self.target), dir=self.out_root)
            os.chmod(self._tmp, 0o777 & ~_umask())
        return self._tmp

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._tmp is None:
                return False
            if exc_type is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                return False
            aside = None
            if os.path.exists(self.target):
                aside = tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.out_root)
                os.replace(self.target, os.path.join(aside, self.name))
            os.replace(self._tmp, self.target)
            if aside:
                shutil.rmtree(aside, ignore_errors=True)
            return False
        finally:
            self._release()

