"""One owner per run folder: an advisory lock that a training process holds for its whole life.

The lock is a POSIX record lock (fcntl.lockf) on the file `.lock` inside the run folder, taken
without waiting. The kernel drops it when its process ends in any way, SIGKILL included, so a dead
run never leaves a stale lock: the file's presence means nothing, only the lock on it does, and the
file is never deleted (deleting it could let two processes lock two different files of one name).
While held, the file names its holder (pid, host, start time, command) for the refusal message;
it is emptied again on release.

POSIX locks rather than flock: NFS (v3 through lockd, v4 natively) and GPFS lock them across nodes,
Lustre does with its `flock` mount option (with `localflock` only within a node), and Linux's NFS
client emulates flock with them anyway. POSIX locks belong to a process, not to an open file, so
one process could lock a file twice and lose both locks by closing either: `_HELD` keeps one lock
per folder per process. A filesystem without locks (ENOLCK, ENOSYS, EOPNOTSUPP) gets a printed
warning and an unprotected run rather than no run.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

from nanochat.common import UserError, print0

LOCK_NAME = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_HELD = {}  # realpath of a lock file -> its RunLock, for the locks this process holds


def holder_info():
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)}


def describe_holder(path):
    """'pid 123 on host n7, started ...' from a held lock file (written by its holder), or a fallback."""
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read() or b"null")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has not written its name yet"


class RunLock:
    """The lock of one run folder. `acquire()` takes it (the folder must exist) or raises UserError
    naming the holder; `release()` gives it back. Both are idempotent."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None
        self.unsupported = False

    @property
    def held(self):
        return self.fd is not None or self.unsupported

    def acquire(self):
        if self.held:
            return
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise self._busy(f"this process (pid {os.getpid()})")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {self.path} ({e.strerror}); check the folder's permissions") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in NO_LOCKS:
                self.unsupported = True
                print0(f"Warning: the filesystem of {self.folder} does not support file locks ({e.strerror}); nothing "
                       f"stops a second process from using this run folder at the same time")
                return
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise self._busy(describe_holder(self.path)) from None
            raise UserError(f"cannot lock {self.path} ({e.strerror})") from None
        self.fd = fd
        _HELD[key] = self
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        except OSError:
            pass  # the name is only for the message of a process that finds the folder locked

    def _busy(self, holder):
        return UserError(f"{self.folder} is in use by a training process ({holder}; lock {self.path}); nothing was "
                         f"changed: wait for it to end or stop it (a stopped run continues with --resume), or pick "
                         f"another --model_tag/--output_dir")

    def release(self):
        self.unsupported = False
        if self.fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(self.fd, 0)  # no holder any more: the file goes back to empty
        except OSError:
            pass
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def ensure_free(folder):
    """UserError naming the holder if a process holds `folder` (for a tool about to write next to a run, e.g.
    its console log); nothing if the folder does not exist."""
    if os.path.isdir(folder):
        lock = RunLock(folder)
        lock.acquire()
        lock.release()
