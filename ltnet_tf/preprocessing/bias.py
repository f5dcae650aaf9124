"""N4 bias-field correction (Tustison et al., "N4ITK: Improved N3 Bias Correction", IEEE TMI 2010),
SimpleITK's ``N4BiasFieldCorrectionImageFilter``, on a mask, at low resolution.

Scanner T1s carry a smooth multiplicative intensity inhomogeneity (receive-coil sensitivity,
±10-30 % across a head at 3 T). N4 fits the log of that field as a B-spline that sharpens the
intensity histogram inside the mask. The field is smooth, so it is fitted on a copy of the scan
block-shrunk to about ``spacing_mm`` and evaluated at every voxel of the full scan (ITK's
B-spline control points live in world coordinates) by linear interpolation of its values on the
fit's grid, which costs a fraction of a full-resolution fit. What it costs and buys here:
``python -m bench.heads`` (bench/results/heads.md, ``bias``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ltnet_tf.io import volumes as data
from ltnet_tf.io.headers import voxel_sizes


@dataclass(frozen=True)
class BiasSettings:
    """N4 as the product runs it (recorded per scan)."""
    spacing_mm: float = 4.0          # the fit's grid: the scan block-shrunk to about this
    iterations: tuple = (50, 50, 30)  # per fitting level (control-point grid doubled each level)
    convergence_threshold: float = 1e-3
    control_points: int = 4          # per axis at the first level (ITK's default)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sitk_image(values: np.ndarray, spacing):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(values))  # numpy axes reversed: x = last
    image.SetSpacing([float(s) for s in spacing[::-1]])
    return image


def correct_bias(scan: data.Volume, mask: np.ndarray,
                 settings: BiasSettings = BiasSettings()) -> tuple:
    """``scan`` with its bias field divided out inside and outside ``mask`` [scan grid] bool ->
    (corrected ``data.Volume`` float32, {'seconds', 'field_min', 'field_max'}: the field's range
    inside the mask, 1 = no change). Intensities must be >= 0 (MR magnitudes); the field is fitted
    only where ``mask`` and the scan are > 0."""
    import SimpleITK as sitk

    start = time.time()
    values = np.asarray(scan.data, np.float32)
    spacing = voxel_sizes(scan.affine)
    fit_mask = np.asarray(mask, bool) & (values > 0)
    image = _sitk_image(np.maximum(values, 0.0), spacing)
    mask_image = _sitk_image(fit_mask.astype(np.uint8), spacing)
    factors = [max(1, int(round(settings.spacing_mm / s))) for s in spacing[::-1]]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Cast(sitk.Shrink(mask_image, factors) > 0, sitk.sitkUInt8)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in settings.iterations])
    corrector.SetConvergenceThreshold(settings.convergence_threshold)
    corrector.SetNumberOfControlPoints([settings.control_points] * 3)
    # N4 works on the log of the intensities: the fit sees strictly positive voxels only.
    corrector.Execute(sitk.Cast(small, sitk.sitkFloat32) + 1e-3, small_mask)
    # The field on the fit's grid, interpolated linearly onto every voxel (ITK, threaded): a
    # fortieth of the cost of evaluating the B-spline at each of a 256³ scan's voxels.
    small_field = corrector.GetLogBiasFieldAsImage(small)
    log_field = sitk.GetArrayFromImage(sitk.Resample(small_field, image, sitk.Transform(),
                                                     sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    field = np.exp(log_field).astype(np.float32)
    corrected = dataclasses.replace(scan, data=(values / field).astype(np.float32))
    inside = field[fit_mask] if fit_mask.any() else np.ones(1, np.float32)
    return corrected, {"seconds": round(time.time() - start, 3),
                       "field_min": round(float(inside.min()), 4),
                       "field_max": round(float(inside.max()), 4)}
