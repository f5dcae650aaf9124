"""Training scans on other grids than the atlas's, aligned once and kept: a second run, or a resumed
one, reads the aligned copies instead of aligning again. Keyed by the content of the scan and of the
atlas and by the alignment settings, in ``$LTNET_CACHE_DIR`` (default ``~/.cache/ltnet_tf``).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from absl import logging

from ltnet_tf.files import atomic_write, file_digest
from ltnet_tf.io import volumes as data
from ltnet_tf.registration.alignment import AlignmentSettings, AtlasAligner, on_atlas_grid


def cache_dir() -> str:
    """Where aligned training scans are kept: ``$LTNET_CACHE_DIR`` or ``~/.cache/ltnet_tf``."""
    return os.environ.get("LTNET_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ltnet_tf")


def aligned_copy(aligner: AtlasAligner, path: str, atlas_digest: str, folder: str) -> tuple:
    """(path of the scan on the atlas grid, Alignment or None when cached/skipped).

    Keyed by the content of the scan and of the atlas and by the settings, so a second run or a
    resumed one aligns nothing again, and a changed file is aligned anew.
    """
    key_text = json.dumps([file_digest(path), atlas_digest, aligner.settings.to_dict()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    target = os.path.join(folder, f"{data.scan_name(path)}-{key}.nii.gz")
    if os.path.isfile(target):
        return target, None
    scan = data.load_scan(path)
    alignment = aligner.align(scan, force=True)
    aligned = alignment.resample_scan(scan)
    data.save_nifti(aligned.data, aligned.affine, target, dtype="float32")
    with atomic_write(target[:-len(".nii.gz")] + ".json") as f:
        json.dump({"source": os.path.abspath(path), **alignment.to_dict()}, f, indent=1)
    return target, alignment


def align_training_scans(atlas: data.Volume, atlas_path: str, paths, folder=None,
                         settings: AlignmentSettings = AlignmentSettings()) -> list:
    """Every scan not on the atlas grid replaced by its aligned copy (cached); progress per scan."""
    todo = [p for p in paths if not on_atlas_grid(atlas, _header_only(p))]
    if not todo:
        return list(paths)
    folder = folder or os.path.join(cache_dir(), "aligned")
    aligner = AtlasAligner(atlas, settings)
    atlas_digest = file_digest(atlas_path)
    replaced = {}
    for number, path in enumerate(todo, start=1):
        target, alignment = aligned_copy(aligner, path, atlas_digest, folder)
        replaced[path] = target
        if alignment is None:
            logging.info("[%d/%d] %s: aligned copy found in %s", number, len(todo),
                         os.path.basename(path), folder)
        else:
            logging.info("[%d/%d] %s: aligned to the atlas in %.1f s (brain overlap %.2f)%s",
                         number, len(todo), os.path.basename(path), alignment.seconds,
                         alignment.brain_overlap,
                         "" if alignment.ok else f" FLAGGED ({alignment.diagnosis}, see above)")
    return [replaced.get(p, p) for p in paths]


def _header_only(path: str) -> data.Volume:
    """Shape and affine of an image file without reading its voxels."""
    shape, affine = data.load_grid(path)
    return data.Volume(data=np.broadcast_to(np.uint8(0), shape), affine=affine, path=path)
