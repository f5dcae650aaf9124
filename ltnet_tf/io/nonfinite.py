"""NaN and Inf in a scan: background outside the brain, a few holes inside it set to 0, more refused
(and in a label map, refused).

Masking with NaN is common in FSL and AFNI pipelines (``fslmaths -mas`` on a float image, AFNI's
``3dcalc`` with a NaN fill): the brain is whole and everything around it is NaN. Those voxels are
background, set to 0 with one warning giving their count. Inside the brain, a division or a
NaN-masking step writes NaN where the scan held 0 (a ratio image's empty voxels, a brain's few
interior zeros): up to ``MAX_HOLE_FRACTION`` of the brain's voxels (0.5 %; a FreeSurfer brain's
1,303 interior zeros are 0.09 %) are set to 0, the value they stand for, with a warning giving
their count. More than that (a failed bias correction, a broken conversion) leaves too little
intensity to register: refused, naming the count.
"Outside" is what is connected to the edge of the field of view through NaN/Inf or zero voxels,
in regions of at least ``MIN_BACKGROUND_FRACTION`` of it (a masked scan's background is a large
part of it; a few NaN voxels in a corner of a brain that fills the field of view are not); the
brain is every other voxel.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ltnet_tf.errors import DataError
from ltnet_tf.io.file_warnings import warn_once

MIN_BACKGROUND_FRACTION = 0.01
MAX_HOLE_FRACTION = 0.005  # of the brain's voxels: NaN/Inf holes inside it set to 0 up to this


def background_or_refused(values: np.ndarray, path: str) -> np.ndarray:
    """``values`` with non-finite voxels set to 0 when they are outside the brain or a few holes
    inside it (a warning gives their count, once per file); the array itself when every voxel is
    finite. Raises DataError naming ``path`` when every voxel is NaN/Inf, or more than
    ``MAX_HOLE_FRACTION`` of the brain's voxels."""
    bad = ~np.isfinite(values)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return values
    if n_bad == values.size:
        raise DataError(f"{path}: contains {n_bad} NaN/Inf voxels")  # all: nothing to rescue
    background = _background(bad | (np.nan_to_num(values, nan=1.0) == 0))
    inside = n_bad - int(np.count_nonzero(bad & background))
    brain = values.size - int(np.count_nonzero(background))
    if inside > MAX_HOLE_FRACTION * brain:
        where = (f" inside the brain (and {n_bad - inside} outside it)" if inside < n_bad
                 else f" ({100 * n_bad / values.size:.2g} %)")
        raise DataError(f"{path}: contains {inside} NaN/Inf voxels{where}: set them to 0 (e.g. "
                        f"fslmaths IN -nan OUT) or redo the step that wrote them")
    if inside:
        warn_once("nonfinite", path, "%s: %d NaN/Inf voxels inside the brain (%.2g %% of its "
                  "voxels) set to 0, and %d outside it taken as background", path, inside,
                  100 * inside / brain, n_bad - inside)
    else:
        warn_once("nonfinite", path, "%s: %d NaN/Inf voxels outside the brain, taken as "
                  "background (0)", path, n_bad)
    cleaned = values.copy()
    cleaned[bad] = 0
    return cleaned


def refuse_any(values: np.ndarray, path: str) -> None:
    """A label map holds no NaN/Inf at all: DataError naming ``path`` and the count."""
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if n_bad == values.size:
        raise DataError(f"{path}: contains {n_bad} NaN/Inf voxels")  # all: nothing to rescue
    if n_bad:
        raise DataError(f"{path}: contains {n_bad} NaN/Inf voxels ({100 * n_bad / values.size:.2g}"
                        f" %): set them to 0 (e.g. fslmaths IN -nan OUT) or redo the step that "
                        f"wrote them")


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
