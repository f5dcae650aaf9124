"""A scan of another contrast made atlas-like before refinement: intensity transfer through the
joint histogram of the aligned scan and the atlas.

After the affine alignment the same tissues mostly overlap, so the atlas intensity expected at a
scan intensity, E[atlas | scan], maps each of the scan's tissues to the atlas's intensity of that
tissue, whatever the order of the tissues in the scan's contrast (T2: CSF brightest; FLAIR: CSF
dark, grey above white; PD: little contrast). The conditional mean is the correlation ratio's
regression (Roche et al., "The correlation ratio as a new similarity measure for multimodal image
registration", MICCAI 1998). Refinement then runs LT-Net's local NCC on the mapped scan.

Chosen by measurement, while building it, over normalised gradient fields in the refinement
(``refinement.FixedScanNGF``, ``RefinementSettings(similarity="ngf")``): on sub-06 and MICCAI
1000 remapped to T2-, FLAIR- and PD-like contrasts (``bench/contrasts.py``), mean Dice 0.740 /
0.727 / 0.691 with this mapping (the histogram then taken where both images had tissue) against
0.655 / 0.662 / 0.653 with NGF (eps 0.05, smoothness weight 4 or 0.5: no better) and 0.714 /
0.597 / 0.672 with local NCC on the scan as it is (T1: 0.767). A T1 scan loses 0.010 with the
mapping, so it is used only where the alignment's check flags the scan (``--similarity auto``) or
when asked (``--similarity remap``). The committed figures: ``python -m bench.heads``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ltnet_tf.io import intensity, volumes as data

SIMILARITIES = ("auto", "ncc", "remap")
HISTOGRAM_BINS = 64


def atlas_like(aligned: data.Volume, atlas_normalized: np.ndarray,
               bins: int = HISTOGRAM_BINS) -> data.Volume:
    """``aligned`` (on the atlas grid) with each voxel's normalised intensity replaced by the mean
    normalised atlas intensity of the scan's voxels in its intensity bin (of ``bins`` over [0, 1],
    the histogram smoothed over one bin); the scan's background (0) stays 0."""
    scan = intensity.normalize_array(aligned.data)
    inside = np.asarray(aligned.data) != 0
    index = np.minimum((scan * bins).astype(np.int64), bins - 1)
    counts = ndimage.gaussian_filter1d(
        np.bincount(index[inside], minlength=bins).astype(np.float64), 1.0)
    sums = ndimage.gaussian_filter1d(
        np.bincount(index[inside], weights=atlas_normalized[inside], minlength=bins), 1.0)
    table = np.where(counts > 1e-6, sums / np.maximum(counts, 1e-6), 0.0)
    mapped = np.where(inside, table[index], 0.0).astype(np.float32)
    return dataclasses.replace(aligned, data=mapped)
