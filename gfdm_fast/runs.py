"""Run and output folders that two processes can never share by accident.

* ``new_run_id()``: the default run id, a time stamp plus a random suffix, so runs started in the same
  second still get distinct folders.
* ``FolderLock``: an advisory lock (``fcntl.flock`` on ``FOLDER/.gfdm.lock``) held for the life of a
  ``train`` or ``generate``; a second process gets one message naming the holder. The kernel drops the
  lock when the holder dies, even by ``kill -9``, so a crashed run never blocks the next one.
* ``clean_stale_temporaries(folder)``: temporary files and folders that a killed run left behind. Only
  called with the folder's lock held, so nothing it removes can belong to a live process.
"""
import datetime
import json
import os
import secrets
import shutil
import socket
import sys

from gfdm_fast.errors import UserError

LOCK_FILE = ".gfdm.lock"


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: a time stamp and 6 random hex digits (the folder is still created
    exclusively, so even a collision could not make two runs share it)."""
    return f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _holder(path):
    try:
        with open(path) as f:
            h = json.load(f)
        return f"process {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """Exclusive advisory lock on ``folder`` (created if missing); use as a context manager or acquire/release."""

    def __init__(self, folder: str, what: str = "gfdm-fast"):
        self.folder, self.what = os.fspath(folder), what
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "FolderLock":
        import fcntl
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.folder} is in use by {_holder(self.path)}; wait for it to finish, "
                            "or choose another folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what,
                "since": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def clean_stale_temporaries(folder: str, recursive: bool = True) -> list:
    """Remove ``*.tmp`` files and ``.tmp-*`` folders under ``folder``; returns what was removed.

    Call only while holding ``FolderLock(folder)``: every temporary file there then belongs to a dead run.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for root, dirs, files in os.walk(folder):
        for d in [d for d in dirs if d.startswith(".tmp-")]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            removed.append(os.path.join(root, d))
            dirs.remove(d)
        for f in files:
            if f.endswith(".tmp"):
                try:
                    os.remove(os.path.join(root, f))
                    removed.append(os.path.join(root, f))
                except OSError:
                    pass
        if not recursive:
            break
    return removed
