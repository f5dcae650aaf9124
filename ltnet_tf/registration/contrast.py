"""A scan of another contrast than the atlas's: recognised after the alignment, named, and (as a
measured alternative to MIND-SSC) mapped to the atlas's contrast.

Recognised (``IntensityRelation``): after the affine alignment the same tissues mostly overlap,
whatever their intensities. How well the atlas's intensity is predicted by the scan's, through any
function, is the correlation ratio (Roche et al., "The correlation ratio as a new similarity
measure for multimodal image registration", MICCAI 1998):

    eta = sqrt(1 - E[Var(atlas | scan)] / Var(atlas)),

with the scan's intensities in bins. It is as high for a T2-, FLAIR- or PD-like scan as for a T1
when the anatomy lines up, and lower when it does not (an upside-down header, swapped axes, a noise
volume), while the plain correlation is negative or near 0 for the other contrasts, which the
alignment check once took for a failed alignment. Named (``contrast_name``): by the order of the
scan's median intensities over the atlas's dark, middle and bright tissue (for a T1 atlas: CSF,
grey, white matter; the classes from a 3-class k-means of the atlas's intensities):

    T1-like     dark < middle < bright, bright at least 10 % above middle (the atlas's order)
    T2-like     bright darkest, spread (max(dark, middle) - bright) / max(dark, middle) >= 0.4
    PD-like     bright darkest, spread below 0.4 (little contrast)
    FLAIR-like  dark darkest, middle brightest or within 10 % of bright (fluid suppressed, grey
                as bright as white or brighter)

Thresholds from the medians of sub-06/07 and MICCAI 1000/1001 after the alignment
(``bench.contrasts``' recipes): T1s' bright tissue 16-31 % above the middle one, a FLAIR-like
scan's 6 % (the rest below it); spreads 0.17-0.30 for PD-like scans, 0.45-0.51 for T2-like ones
(the atlas's dark class, CSF, overlaps grey matter after an affine alignment alone, so its median
can fall below the middle one's even in a T2).

Mapped (``atlas_like``, ``--similarity remap``): each voxel's intensity replaced by E[atlas |
scan], the correlation ratio's regression, through the joint histogram of the aligned scan and the
atlas; refinement then runs local NCC on the mapped scan. Measured against MIND-SSC in
``bench/results/contrasts.md``.
"""
from __future__ import annotations

import dataclasses

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import numpy as np
import tensorflow as tf
from scipy import ndimage

from ltnet_tf.io import intensity, volumes as data

SIMILARITIES = ("auto", "ncc", "mind", "remap")
# What ``--similarity auto`` registers a scan of another contrast with (bench/results/contrasts.md).
AUTO_OTHER_CONTRAST = "mind"
HISTOGRAM_BINS = 64
RELATION_BINS = 32
CONTRAST_NAMES = ("T1-like", "T2-like", "FLAIR-like", "PD-like", "other")
PD_SPREAD = 0.4
FLAIR_GAP = 0.1


def atlas_like(aligned: data.Volume, atlas_normalized: np.ndarray,
               bins: int = HISTOGRAM_BINS) -> data.Volume:
    """``aligned`` (on the atlas grid) in the atlas's contrast: ``atlas_like_array`` of its
    normalised intensities."""
    mapped = atlas_like_array(intensity.normalize_array(aligned.data), atlas_normalized, bins,
                              inside=np.asarray(aligned.data) != 0)
    return dataclasses.replace(aligned, data=mapped)


def atlas_like_array(scan: np.ndarray, atlas: np.ndarray, bins: int = HISTOGRAM_BINS,
                     inside: np.ndarray = None) -> np.ndarray:
    """``scan`` (intensities in [0, 1]) with each voxel's intensity replaced by the mean ``atlas``
    intensity (same grid) of the scan's voxels in its intensity bin (of ``bins``, the histogram
    smoothed over one bin), over the voxels ``inside`` (default: scan > 0); 0 elsewhere."""
    scan, atlas = np.asarray(scan, np.float32), np.asarray(atlas, np.float32)
    inside = scan > 0 if inside is None else inside
    index = np.minimum((np.clip(scan, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    counts = ndimage.gaussian_filter1d(
        np.bincount(index[inside], minlength=bins).astype(np.float64), 1.0)
    sums = ndimage.gaussian_filter1d(
        np.bincount(index[inside], weights=atlas[inside], minlength=bins), 1.0)
    table = np.where(counts > 1e-6, sums / np.maximum(counts, 1e-6), 0.0)
    return np.where(inside, table[index], 0.0).astype(np.float32)


def atlas_like_tensor(scan: tf.Tensor, scan_grid: tf.Tensor, atlas_grid: tf.Tensor,
                      bins: int = HISTOGRAM_BINS) -> tf.Tensor:
    """``atlas_like_array`` in TensorFlow, for B scan-atlas pairs at once: the joint histogram of
    ``scan_grid`` [B, *grid] (normalised scans on a coarser grid, > 0 inside) and ``atlas_grid``
    [B, *grid] (the registered atlases there) maps ``scan`` [B, D, H, W, 1] (the normalised scans
    on their own grid) to each atlas's contrast; 0 stays 0."""
    count = tf.shape(scan_grid)[0]

    def bin_of(values):
        return tf.minimum(tf.cast(tf.clip_by_value(values, 0.0, 1.0) * bins, tf.int32), bins - 1)

    rows = tf.range(count)[:, None] * bins
    ids = tf.reshape(tf.reshape(bin_of(scan_grid), [count, -1]) + rows, [-1])
    inside = tf.reshape(tf.cast(scan_grid > 0, tf.float32), [-1])
    totals = [tf.reshape(tf.math.unsorted_segment_sum(v, ids, count * bins), [count, bins, 1])
              for v in (inside, inside * tf.reshape(atlas_grid, [-1]))]
    kernel = np.exp(-0.5 * np.arange(-4, 5) ** 2)  # scipy's gaussian_filter1d, sigma 1 bin
    kernel = tf.constant((kernel / kernel.sum()).reshape(9, 1, 1), tf.float32)
    counts, sums = (tf.nn.conv1d(tf.pad(t, [[0, 0], [4, 4], [0, 0]], "SYMMETRIC"), kernel, 1,
                                 "VALID")[..., 0] for t in totals)
    table = tf.reshape(tf.where(counts > 1e-6, sums / tf.maximum(counts, 1e-6), 0.0), [-1])
    index = tf.reshape(bin_of(scan[..., 0]), [count, -1]) + rows
    mapped = tf.reshape(tf.gather(table, index), tf.shape(scan[..., 0]))
    return tf.where(scan > 0, mapped[..., None], 0.0)


def correlation_ratio(scan: np.ndarray, atlas: np.ndarray, bins: int = RELATION_BINS) -> float:
    """eta of ``atlas`` given ``scan`` (1-D arrays of the same voxels; scan in [0, 1]), in [0, 1];
    0 when the atlas does not vary."""
    index = np.minimum((np.clip(scan, 0.0, 1.0) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    sums = np.bincount(index, weights=atlas, minlength=bins)
    squares = np.bincount(index, weights=atlas * atlas, minlength=bins)
    within = float(np.sum(squares - np.where(counts > 0, sums * sums / np.maximum(counts, 1), 0)))
    total = float(np.sum((atlas - atlas.mean()) ** 2))
    return float(np.sqrt(max(0.0, 1.0 - within / total))) if total > 0 else 0.0


def local_correlation(scan: np.ndarray, atlas: np.ndarray, mask: np.ndarray,
                      window: int = 5) -> float:
    """Mean over ``mask`` of the squared correlation of ``scan`` and ``atlas`` (volumes of one
    grid) in the ``window``³ box around each voxel (zero outside the volume): the squared local
    NCC of the refinement's loss, which neither a tissue's sign of contrast nor a smooth bias
    changes, but misplaced anatomy does."""
    def box(values):
        return ndimage.uniform_filter(values, window, mode="constant")

    scan, atlas = np.asarray(scan, np.float64), np.asarray(atlas, np.float64)
    scan_mean, atlas_mean = box(scan), box(atlas)
    cross = box(scan * atlas) - scan_mean * atlas_mean
    scan_var = np.maximum(box(scan * scan) - scan_mean ** 2, 0.0)
    atlas_var = np.maximum(box(atlas * atlas) - atlas_mean ** 2, 0.0)
    squared = cross * cross / (scan_var * atlas_var + 1e-6)
    return float(squared[mask].mean()) if mask.any() else 0.0


def tissue_centres(values: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Sorted centres [3] of a 3-class k-means of ``values`` (1-D), started at their 10th, 50th
    and 90th percentiles."""
    centres = np.percentile(values, [10, 50, 90]).astype(np.float64)
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        updated = np.array([values[nearest == k].mean() if np.any(nearest == k) else centres[k]
                            for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return np.sort(centres)


def tissue_classes(atlas_values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[3, *shape] bool: the atlas's dark, middle and bright tissue inside ``mask``: the voxels
    nearest each k-means centre and within a quarter of the gap to the next centre (few partial
    volumes)."""
    centres = tissue_centres(atlas_values[mask])
    gaps = np.diff(centres)
    width = np.array([gaps[0], min(gaps), gaps[1]]) / 4.0
    return np.stack([mask & (np.abs(atlas_values - c) <= w) for c, w in zip(centres, width)])


def contrast_name(means) -> str:
    """``CONTRAST_NAMES`` entry of the scan's median intensities over the atlas's dark, middle and
    bright tissue (see the module docstring)."""
    dark, middle, bright = (float(m) for m in means)
    if dark < middle < bright and bright - middle >= FLAIR_GAP * bright:
        return "T1-like"
    if bright < min(dark, middle):
        spread = (max(dark, middle) - bright) / max(dark, middle, 1e-6)
        return "T2-like" if spread >= PD_SPREAD else "PD-like"
    if dark < min(middle, bright):
        return "FLAIR-like"
    return "other"


@dataclasses.dataclass(frozen=True)
class IntensityRelation:
    """How an aligned scan's intensities relate to the atlas's, inside the atlas's brain."""
    correlation: float            # Pearson's r
    correlation_ratio: float      # eta of the atlas given the scan
    local_correlation: float      # mean squared local correlation (``local_correlation``)
    tissue_medians: tuple         # the scan's medians over the atlas's dark, middle, bright tissue
    contrast: str                 # ``contrast_name`` of those

    @classmethod
    def measure(cls, scan_values: np.ndarray, atlas_values: np.ndarray, mask: np.ndarray,
                classes: np.ndarray) -> "IntensityRelation":
        """``scan_values`` (normalised, on the atlas's grid), ``atlas_values`` (normalised), the
        atlas's brain ``mask`` and its ``tissue_classes``."""
        scan, atlas = scan_values[mask], atlas_values[mask]
        correlation = float(np.corrcoef(scan, atlas)[0, 1])
        medians = tuple(round(float(np.median(scan_values[c])), 4) if c.any() else 0.0
                        for c in classes)
        return cls(correlation if np.isfinite(correlation) else 0.0,
                   correlation_ratio(scan, atlas),
                   local_correlation(scan_values, atlas_values, mask), medians,
                   contrast_name(medians))
