"""Training scans made ready once and kept: scans on other grids than the atlas's aligned to it, and
whole heads skull-stripped and N4-corrected first (``ltnet_tf.preprocessing``, as predict.py does);
a second run, or a resumed one, reads the copies instead of making them again. Keyed by the content
of the scan and of the atlas and by the alignment and preparation settings, in ``$LTNET_CACHE_DIR``
(default ``~/.cache/ltnet_tf``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from ltnet_tf.files import atomic_write, cache_dir, file_digest
from ltnet_tf.io import volumes as data
from ltnet_tf.preprocessing.preparation import ScanPreparation
from ltnet_tf.registration.alignment import AlignmentSettings, AtlasAligner, on_atlas_grid


def aligned_copy(aligner: AtlasAligner, path: str, atlas_digest: str, folder: str,
                 preparation: ScanPreparation = None) -> tuple:
    """(path of the scan made ready, on the atlas grid; its record {'alignment', 'preparation'}
    or None when the copy was cached).

    ``preparation``: strip and correct the scan first (a whole head). A scan on the atlas grid is
    not aligned (as without a cache). Keyed by the content of the scan and of the atlas and by
    the settings, so a second run or a resumed one makes nothing again, and a changed file is
    made anew. Raises DataError naming the scan (a brain that cannot be aligned or stripped).
    """
    settings = [aligner.settings.to_dict(), None if preparation is None
                else preparation.options.to_dict()]
    key_text = json.dumps([file_digest(path), atlas_digest, settings])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    target = os.path.join(folder, f"{data.scan_name(path)}-{key}.nii.gz")
    if os.path.isfile(target):
        return target, None
    scan = data.load_scan(path)
    record = {"source": os.path.abspath(path), "alignment": None, "preparation": None}
    if preparation is not None:
        prepared = preparation(scan)
        scan, record["preparation"] = prepared.scan, prepared.to_dict()
        if prepared.brain_mask is not None and not prepared.brain_mask.ok:
            logging.warning("%s", prepared.brain_mask.describe(path))
    if not on_atlas_grid(aligner.atlas, scan):
        alignment = aligner.align(scan, force=True)
        scan, record["alignment"] = alignment.resample_scan(scan), alignment.to_dict()
    data.save_nifti(scan.data, scan.affine, target, dtype="float32")
    with atomic_write(target[:-len(".nii.gz")] + ".json") as f:
        json.dump(record, f, indent=1)
    return target, record


def align_training_scans(atlas: data.Volume, atlas_path: str, paths, folder=None,
                         settings: AlignmentSettings = AlignmentSettings(),
                         preparation: ScanPreparation = None, prepare=(),
                         align: bool = True) -> list:
    """Every scan of ``prepare`` (whole heads: stripped and corrected by ``preparation``), and
    with ``align`` every scan not on the atlas grid, replaced by its copy made ready (cached);
    progress per scan."""
    todo = [p for p in paths if p in prepare
            or (align and not on_atlas_grid(atlas, _header_only(p)))]
    if not todo:
        return list(paths)
    folder = folder or os.path.join(cache_dir(), "aligned")
    aligner = AtlasAligner(atlas, settings)
    atlas_digest = file_digest(atlas_path)
    replaced = {}
    for number, path in enumerate(todo, start=1):
        start = time.time()
        target, record = aligned_copy(aligner, path, atlas_digest, folder,
                                      preparation if path in prepare else None)
        replaced[path] = target
        name = os.path.basename(path)
        if record is None:
            logging.info("[%d/%d] %s: copy made ready before found in %s", number, len(todo),
                         name, folder)
            continue
        done = []
        if record["preparation"] is not None:
            mask = record["preparation"]["brain_mask"]
            done.append(f"skull-stripped (brain mask {mask['volume_l']:.2f} L)"
                        if mask else "bias-corrected")
        found = record["alignment"]
        if found is not None:
            done.append(f"aligned to the atlas (brain overlap {found['brain_overlap']:.2f})"
                        + ("" if found["ok"] else f" FLAGGED ({found['diagnosis']}, see above)"))
        logging.info("[%d/%d] %s: %s in %.1f s", number, len(todo), name, " and ".join(done),
                     time.time() - start)
    return [replaced.get(p, p) for p in paths]


def _header_only(path: str) -> data.Volume:
    """Shape and affine of an image file without reading its voxels."""
    shape, affine = data.load_grid(path)
    return data.Volume(data=np.broadcast_to(np.uint8(0), shape), affine=affine, path=path)
