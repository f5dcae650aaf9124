"""NaN and Inf in a scan: background outside the brain, refused inside it.

Masking with NaN is common in FSL and AFNI pipelines (``fslmaths -mas`` on a float image, AFNI's
``3dcalc`` with a NaN fill): the brain is whole and everything around it is NaN. Those voxels are
background, set to 0 with one warning giving their count. NaN inside the brain (a failed bias
correction, a division by zero in a ratio image) leaves no intensity to register there: refused.
"Outside" is what is connected to the edge of the field of view through NaN/Inf or zero voxels,
in regions of at least ``MIN_BACKGROUND_FRACTION`` of it (a masked scan's background is a large
part of it; a few NaN voxels in a corner of a brain that fills the field of view are not).
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging
from scipy import ndimage

from ltnet_tf.errors import DataError

MIN_BACKGROUND_FRACTION = 0.01
_WARNED = set()  # files whose background NaNs were reported already (a scan is read twice)


def background_or_refused(values: np.ndarray, path: str) -> np.ndarray:
    """``values`` with non-finite voxels outside the brain set to 0 (a warning gives their count,
    once per file); the array itself when every voxel is finite. Raises DataError naming ``path``
    when every voxel, or any voxel inside the brain, is NaN/Inf."""
    bad = ~np.isfinite(values)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return values
    if n_bad == values.size:
        raise DataError(f"{path}: contains {n_bad} NaN/Inf voxels")  # all: nothing to rescue
    outside = bad & _background(bad | (np.nan_to_num(values, nan=1.0) == 0))
    inside = n_bad - int(np.count_nonzero(outside))
    if inside:
        where = (f" inside the brain (and {n_bad - inside} outside it)" if inside < n_bad
                 else f" ({100 * n_bad / values.size:.2g} %)")
        raise DataError(f"{path}: contains {inside} NaN/Inf voxels{where}: set them to 0 (e.g. "
                        f"fslmaths IN -nan OUT) or redo the step that wrote them")
    key = os.path.abspath(path)
    if key not in _WARNED:
        _WARNED.add(key)
        logging.warning("%s: %d NaN/Inf voxels outside the brain, taken as background (0)", path,
                        n_bad)
    cleaned = values.copy()
    cleaned[bad] = 0
    return cleaned


def _background(empty: np.ndarray) -> np.ndarray:
    """The voxels of ``empty`` (NaN/Inf or 0) in regions that reach the edge of the field of
    view and hold at least ``MIN_BACKGROUND_FRACTION`` of it."""
    regions, _ = ndimage.label(empty)
    edges = np.concatenate([regions[[0, -1]].ravel(), regions[:, [0, -1]].ravel(),
                            regions[:, :, [0, -1]].ravel()])
    sizes = np.bincount(regions.ravel())
    large = [r for r in np.unique(edges)
             if r != 0 and sizes[r] >= MIN_BACKGROUND_FRACTION * empty.size]
    return np.isin(regions, large)
