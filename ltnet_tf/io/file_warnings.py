"""Warnings about an input file, given once per run however often the file is read.

A scan is read more than once in a run: checked with every other input first, then read again to
be segmented, by the same process or (``predict.py --jobs N``) by another process of the run. What
its reading finds (a sform/qform disagreement, NaN voxels taken as background) is said once, when
the checks read it; a warning given again while the scan is segmented would also land in the
scan's record (``prediction.run_records``) of one run and not of another. The other processes of
a run are handed what was said (``given``, ``mark_given``) and stay as quiet as the first.
"""
from __future__ import annotations

import os

from absl import logging

_GIVEN = set()  # (kind, absolute path) of the warnings given in this process (or its run)


def warn_once(kind: str, path: str, message: str, *args) -> bool:
    """Log ``message % args`` as a warning unless a warning of ``kind`` about the file ``path``
    was given already in this run; returns whether it was logged."""
    key = (kind, os.path.abspath(path))
    if key in _GIVEN:
        return False
    _GIVEN.add(key)
    logging.warning(message, *args)
    return True


def given() -> list:
    """[(kind, absolute path)] of the warnings given so far (to hand to another process)."""
    return sorted(_GIVEN)


def mark_given(entries) -> None:
    """Take ``entries`` (``given()`` of another process of the run) as given here."""
    _GIVEN.update((str(kind), str(path)) for kind, path in entries)
