"""Is a scan a skull-stripped brain of plausible size, and if not, the likeliest reason why.

The tissue is measured on robustly normalised intensities (``ltnet_tf.io.intensity``): a few extreme
voxels neither move the tissue threshold nor count as a background, and a background that is not 0
(-1024, an offset) is recognised as such. When the size is implausible, the message names the cause
the figures point to, in this order: the header's sform and qform disagree (the other one would give
a brain's size, or not), the tissue spans more than any head (the voxel sizes in the header are too
large), the field of view is shorter than a brain (a slab, or voxel sizes too small), and otherwise
what the size says (a whole head: strip the skull; too little tissue: not a brain).
"""
from __future__ import annotations

import numpy as np

from ltnet_tf.io import volumes as data
from ltnet_tf.io.headers import format_mm, voxel_sizes

# Adult heads span at most about 250 mm along any axis (neck included); a brain at least 140 mm
# front to back. Beyond these the voxel sizes in the header are the likelier cause.
MAX_HEAD_EXTENT_MM = 300.0
MIN_BRAIN_FIELD_MM = 100.0
# A whole adult head (scalp, skull, neck included) holds at most about this much tissue; a
# defaced one at least 2.78 L (the six heads of ../shared/data/heads: 2.78-3.63 L), while
# skull-stripped adult brains hold 1.0-1.9 L: above MIN_HEAD_ML a scan is taken for a head when
# heads are to be stripped (``looks_like_head``).
MAX_HEAD_ML = 8000.0
MIN_HEAD_ML = 2300.0


def tissue_mask(values: np.ndarray) -> np.ndarray:
    """Voxels brighter than 5% of the 99th percentile of the positive ones, on normalised
    intensities (``intensity.normalize_array``), whose background is 0."""
    positive = values[values > 0]
    if positive.size == 0:
        return np.zeros(values.shape, bool)
    return values > 0.05 * float(np.percentile(positive, 99))


def tissue_volume_ml(volume: data.Volume, values=None, affine=None) -> float:
    """Tissue volume in ml of ``volume``, or of normalised ``values`` on the grid ``affine``."""
    values = volume.normalized_data() if values is None else values
    affine = volume.affine if affine is None else affine
    return float(tissue_mask(values).sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def tissue_extent_mm(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Edge lengths in mm, along the voxel axes, of the box around the tissue."""
    found = np.argwhere(tissue_mask(values))
    if found.size == 0:
        return np.zeros(3)
    return (found.max(axis=0) - found.min(axis=0) + 1) * voxel_sizes(affine)


def check_brain_size(scan: data.Volume, min_ml: float, max_ml: float, values=None,
                     affine=None) -> float:
    """The scan's tissue volume in ml, measured on normalised ``values`` on the grid ``affine``
    (default: the whole scan). Raises ``data.DataError`` naming the likeliest cause when it is not
    between ``min_ml`` and ``max_ml``."""
    if values is None:
        values, affine = scan.normalized_data(), scan.affine
    volume_ml = tissue_volume_ml(scan, values, affine)
    if min_ml <= volume_ml <= max_ml:
        return volume_ml
    too_large = volume_ml > max_ml
    amount = f"{volume_ml / 1000:.1f} litres" if too_large else f"{volume_ml:.0f} ml"
    bound = (f"a skull-stripped brain has under {max_ml / 1000:.1f} litres" if too_large
             else f"a brain has over {min_ml:.0f} ml")
    conflict = scan.header_conflict
    if conflict is not None:
        other_ml = volume_ml * conflict.volume_ratio()
        verdict = "a brain's size" if min_ml <= other_ml <= max_ml else "not a brain's size either"
        raise data.DataError(
            f"{scan.path}: {amount} of tissue with the voxel sizes of its {conflict.used} "
            f"({bound}): {conflict.describe()}; the {conflict.unused} gives "
            f"{other_ml / 1000:.2f} litres, {verdict}; {conflict.fix(scan.path)}")
    extent_mm = tissue_extent_mm(values, affine)
    extent = format_mm(np.round(extent_mm))
    field = np.asarray(scan.shape, float) * voxel_sizes(scan.affine)
    sizes = format_mm(voxel_sizes(scan.affine))
    if too_large and extent_mm.max() > MAX_HEAD_EXTENT_MM:
        raise data.DataError(
            f"{scan.path}: {amount} of tissue spanning {extent}, more than any head: the voxel "
            f"sizes in its header ({sizes}) are likely too large; correct the header")
    if too_large:
        raise data.DataError(
            f"{scan.path}: does not look skull-stripped ({amount} of tissue spanning {extent}; "
            f"{bound}); strip the skull first (e.g. FreeSurfer mri_synthstrip, FSL bet, HD-BET)")
    if field.min() < MIN_BRAIN_FIELD_MM:
        raise data.DataError(
            f"{scan.path}: does not look like a brain scan ({amount} of tissue in a field of view "
            f"of only {format_mm(np.round(field))}, shorter than a brain): a slab or part of a "
            f"brain, or voxel sizes in its header ({sizes}) too small")
    raise data.DataError(
        f"{scan.path}: does not look like a brain scan ({amount} of tissue spanning {extent}; "
        f"{bound}); check the scan and the voxel sizes in its header ({sizes})")


def looks_like_head(scan: data.Volume, values=None, affine=None) -> bool:
    """True when the scan has more tissue than a skull-stripped brain (``MIN_HEAD_ML``) but no
    more than a head (``MAX_HEAD_ML``), within a head's extent, on a brain-sized field of view and
    with a header whose sform and qform agree. ``values``, ``affine``: as ``check_brain_size``."""
    if values is None:
        values, affine = scan.normalized_data(), scan.affine
    volume_ml = tissue_volume_ml(scan, values, affine)
    field = np.asarray(scan.shape, float) * voxel_sizes(scan.affine)
    return (scan.header_conflict is None and MIN_HEAD_ML < volume_ml <= MAX_HEAD_ML
            and tissue_extent_mm(values, affine).max() <= MAX_HEAD_EXTENT_MM
            and field.min() >= MIN_BRAIN_FIELD_MM)
