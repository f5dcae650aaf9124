"""One writer per output folder: two ``predict.py`` processes pointed at the same folder (a
mis-configured array job, a run started twice) would interleave their tables; the second is refused.

    OUT/.predict.lock                   a whole-cohort run holds it exclusively; every share of
                                        ``--shard K/N`` holds it shared,
    OUT/.predict.shard-K-of-N.lock      and its own share's lock exclusively

so the shares of one cohort (a SLURM array) run side by side in one folder, each writing only its
own scans and ``.shard-K-of-N`` tables, while a second whole-cohort run, the same share twice, or a
whole-cohort run beside shares is refused with one line naming the holder (process, host, start).
Locks are ``flock`` locks: the kernel releases them when the holder ends, however it ends (SIGKILL
included), so a killed run never leaves the folder locked (the jobs of ``--jobs N`` die with the
process that holds it: ``jobs``). On NFS, Linux maps ``flock`` onto NFS byte-range locks (NFSv4,
or v3 with a lock daemon).

A run takes its lock before it reads anything when the folder exists already (a second writer is
refused at once), else as it makes the folder (once its inputs are checked and its model loaded:
only a run started at the same moment can be there); ``predict.py`` also asks
(``refuse_if_taken``) before it imports TensorFlow, so a busy folder is refused within a second.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time

from ltnet_tf.config import ConfigError
from ltnet_tf.errors import DataError

MAIN_LOCK = ".predict.lock"


def parse_shard(text: str) -> tuple:
    """'K/N' (1 <= K <= N) -> (K, N); ConfigError otherwise."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be K/N (e.g. 3/10), got {text!r}") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text}: K must be between 1 and N")
    return k, n


def shard_lock_name(shard) -> str:
    return ".predict.shard-{}-of-{}.lock".format(*shard)


class OutputLock:
    """The lock of one prediction on its output folder ``path`` (created already); ``shard``:
    (K, N) or None. ``acquire`` raises DataError naming the holder when another process writes
    there; ``release`` (or the end of the process) frees it."""

    def __init__(self, path: str, shard=None):
        self.path, self.shard = path, shard
        self._held = []

    @property
    def held(self) -> bool:
        return bool(self._held)

    def acquire(self, announce: bool = True) -> "OutputLock":
        """Take the lock (``announce``: and write who holds it into the lock file)."""
        try:
            if self.shard is None:
                self._take(MAIN_LOCK, fcntl.LOCK_EX, announce)
            else:
                self._take(MAIN_LOCK, fcntl.LOCK_SH, announce)
                self._take(shard_lock_name(self.shard), fcntl.LOCK_EX, announce)
        except BlockingIOError:
            self.release()
            holders = "; ".join(self.holders()) or "another predict.py process"
            raise DataError(f"{self.path}: another predict.py is writing to this folder "
                            f"({holders}): wait for it to finish, or give this run another "
                            f"--output_dir (shares of one cohort: --shard K/N)") from None
        except OSError as e:
            self.release()
            raise DataError(f"{self.path}: cannot lock the output folder ({e.strerror})") \
                from None
        return self

    def _take(self, name: str, mode: int, announce: bool = True) -> None:
        descriptor = os.open(os.path.join(self.path, name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise
        self._held.append(descriptor)
        if mode == fcntl.LOCK_EX and announce:  # the exclusive holder says who it is
            share = "whole cohort" if self.shard is None else "share {}/{}".format(*self.shard)
            text = (f"process {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {share}\n")
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, text.encode(), 0)

    def holders(self) -> list:
        """Who holds a lock on the folder now: the text of each lock file held exclusively."""
        found = []
        for name in sorted(os.listdir(self.path)):
            if not (name.startswith(".predict") and name.endswith(".lock")):
                continue
            path = os.path.join(self.path, name)
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(descriptor, fcntl.LOCK_UN)  # nobody holds it exclusively
            except BlockingIOError:
                with open(path) as f:
                    text = f.read().strip()
                found.append(text or name)
            finally:
                os.close(descriptor)
        return found

    def release(self) -> None:
        for descriptor in reversed(self._held):
            os.close(descriptor)  # closing the last descriptor releases its flock
        self._held = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def refuse_if_taken(path: str, shard=None) -> None:
    """Raise the DataError ``OutputLock.acquire`` would if another process holds the folder
    ``path``, without keeping the lock (a run takes it for good later, before any model loads).
    A folder never locked is held by nobody: nothing is created in it."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, MAIN_LOCK)) or not os.access(path, os.W_OK):
        return
    OutputLock(path, shard).acquire(announce=False).release()
