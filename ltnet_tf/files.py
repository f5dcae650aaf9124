"""Writing files so that a crash, a full disk or a kill never leaves half of one behind.

Every output of the package (segmentations, tables, JSON records, pictures, checkpoints' records)
is written under a hidden temporary name in the same folder and renamed into place; a rename within
a folder is atomic, so a reader sees either the old file or the whole new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os


def cache_dir() -> str:
    """What the package keeps between runs (aligned training scans, compiled code):
    ``$LTNET_CACHE_DIR`` or ``~/.cache/ltnet_tf``."""
    return os.environ.get("LTNET_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ltnet_tf")


def temporary_name(path: str) -> str:
    """A hidden name beside ``path``, unique to this process, with the same extension (libraries
    such as nibabel and matplotlib choose the format from it)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    stem, dot, extension = name.partition(".")
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}{dot}{extension}")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path to write ``path``'s content to; renamed to ``path`` on success,
    removed on failure (the exception propagates)."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_options):
    """``open(path, mode)`` that only replaces ``path`` once the ``with`` block has finished."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_options) as f:
            yield f


def write_json(payload, path: str, *, indent: int = 2) -> str:
    """``payload`` as JSON (no NaN: use None) followed by a newline, written atomically."""
    with atomic_write(path) as f:
        json.dump(payload, f, indent=indent, allow_nan=False)
        f.write("\n")
    return path


def file_digest(path: str) -> str:
    """SHA-256 of a file's content (hex): what identifies an atlas or a model across machines."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
