"""Affine alignment of a scan to the atlas, so that scans on any grid can be trained on and segmented.

LT-Net learns the non-linear part of the atlas-to-scan correspondence; the global position, size and
orientation of a head must be removed first. Here: rigid, then affine (12 degrees of freedom), Mattes
mutual information (the atlas's contrast differs from the subjects'), a start from the centres of
mass (image moments: header origins of real data can lie 200 mm from the brain), coarse-to-fine.

Why SimpleITK: it registers arrays held in memory (no temporary files, unlike ANTsPy's command-line
wrapper), each stage is set up explicitly, its wheel is a quarter of ANTsPy's, and its transforms are
ITK's, the same files ANTs reads. Why a coarse grid: the registration runs on every scan, and a
12-parameter affine is fully determined at 4 mm; both images are block-averaged to about 4 mm first
(seconds instead of a minute), and the result is then applied to the full-resolution scan.

Conventions. ITK registers in LPS world coordinates and its transform maps *fixed* (atlas) points to
*moving* (scan) points: exactly what resampling the scan onto the atlas grid needs. ``Alignment``
keeps it as ``atlas_to_scan_world`` (4x4, in nibabel's RAS world) and the voxel-to-voxel map
``atlas_voxel_to_scan_voxel``; its inverse takes a native voxel to the atlas grid, through which the
atlas labels are pulled directly onto the scan's own voxels (``ltnet_tf.registration.native``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from absl import logging
from scipy import ndimage

from ltnet_tf.io import plausibility, volumes as data
from ltnet_tf.io.plausibility import tissue_mask, tissue_volume_ml  # noqa: F401  (public here too)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class AlignmentSettings:
    """How a scan is aligned and when an alignment counts as failed (recorded with every output)."""
    spacing_mm: float = 4.0          # registration grid (both images block-averaged to about this)
    histogram_bins: int = 32         # Mattes mutual information
    sampling_fraction: float = 0.25  # of the coarse voxels, random with a fixed seed (deterministic)
    rigid_iterations: int = 60       # per level
    affine_iterations: int = 60
    # ITK threads of the registration method: 1 is bit-repeatable (several threads sum the
    # metric's histograms in varying order: affines differing by ~1e-5 between runs); 0: ITK's own.
    registration_threads: int = 1
    # Failure thresholds, calibrated on the 25 real brains of ../shared/data (native/ and
    # miccai2012/): correct alignments reach brain-mask Dice 0.924-0.954 and intensity correlation
    # 0.643-0.779 with the atlas (on robustly normalised intensities); broken ones (an upside-down
    # header, swapped axes, noise volumes) reach Dice 0.82-0.95 but correlation 0.28-0.50
    # (bench/results/alignment.md). Correlation separates them; the overlap catches gross
    # misplacement.
    min_brain_overlap: float = 0.85
    min_correlation: float = 0.58
    # A good overlap with a correlation below this is a contrast mismatch, not a misalignment: MI
    # aligns an inverted (T2-like) or FLAIR-like scan as well as a T1 one, and its intensities then
    # correlate with the atlas's at -0.46 to 0.18 (the 25 brains in those contrasts), while broken
    # orientations reach 0.49-0.50 and noise volumes 0.28-0.30 (bench/results/alignment.md): the
    # threshold sits halfway between 0.18 and 0.28.
    max_contrast_correlation: float = 0.23
    # Skull-stripped adult brains (with the CSF inside the mask) hold 1.0-1.9 litres of tissue; a
    # whole head is 3-5 litres, a single organ or a phantom far less.
    min_tissue_ml: float = 500.0
    max_tissue_ml: float = 2800.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Alignment:
    """The affine found for one scan, with its quality figures."""
    atlas_to_scan_world: np.ndarray       # 4x4, RAS mm: atlas point -> scan point (pull)
    atlas_affine: np.ndarray              # atlas voxel -> RAS world
    scan_affine: np.ndarray               # scan voxel -> RAS world
    atlas_shape: tuple
    scan_shape: tuple
    brain_overlap: float = 1.0            # Dice of the atlas's and the aligned scan's brain masks
    mutual_information: Optional[float] = None
    correlation: Optional[float] = None   # of the aligned scan's and the atlas's intensities
    seconds: float = 0.0
    skipped: bool = False                 # the scan was on the atlas grid already
    min_brain_overlap: float = 0.0
    min_correlation: float = 0.0
    max_contrast_correlation: float = 0.0

    @property
    def ok(self) -> bool:
        return self.skipped or (self.brain_overlap >= self.min_brain_overlap
                                and (self.correlation or 0.0) >= self.min_correlation)

    @property
    def diagnosis(self) -> str:
        """'ok'; 'contrast' when the brain outlines match but the intensities do not correlate
        with the atlas's (another contrast, e.g. T2); else 'orientation' (misaligned: a wrong or
        disagreeing header orientation, swapped axes, or not a brain)."""
        if self.ok:
            return "ok"
        if (self.brain_overlap >= self.min_brain_overlap
                and (self.correlation or 0.0) < self.max_contrast_correlation):
            return "contrast"
        return "orientation"

    @property
    def atlas_voxel_to_scan_voxel(self) -> np.ndarray:
        return np.linalg.inv(self.scan_affine) @ self.atlas_to_scan_world @ self.atlas_affine

    @property
    def scan_voxel_to_atlas_voxel(self) -> np.ndarray:
        return np.linalg.inv(self.atlas_voxel_to_scan_voxel)

    # ------------------------------------------------------------------ resampling
    def resample_scan(self, scan: data.Volume) -> data.Volume:
        """The scan resampled linearly onto the atlas grid (zero outside its field of view)."""
        if self.skipped:
            return scan
        return data.Volume(data=self._resample(scan.data.astype(np.float32), 1, scan.path),
                           affine=self.atlas_affine.copy(), path=scan.path)

    def resample_labels(self, labels: data.Volume) -> data.Volume:
        """A label map on the scan's grid, onto the atlas grid by nearest label (for evaluation
        and validation in atlas space only; segmentations are never made this way)."""
        if self.skipped:
            return labels
        return data.Volume(data=self._resample(labels.data, 0, labels.path).astype(np.int32),
                           affine=self.atlas_affine.copy(), path=labels.path)

    def _resample(self, values: np.ndarray, order: int, path: str) -> np.ndarray:
        if tuple(values.shape) != tuple(self.scan_shape):
            raise data.DataError(f"{path}: shape {values.shape} is not that of the scan this "
                                 f"alignment was found for ({self.scan_shape}); pair each label "
                                 f"map with its own scan")
        return resample_voxels(values, self.atlas_voxel_to_scan_voxel, self.atlas_shape, order)

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        return {"atlas_to_scan_world_ras": np.round(self.atlas_to_scan_world, 8).tolist(),
                "brain_overlap": round(float(self.brain_overlap), 4),
                "correlation": None if self.correlation is None else round(float(self.correlation), 4),
                "mutual_information": (None if self.mutual_information is None
                                       else round(float(self.mutual_information), 4)),
                "seconds": round(float(self.seconds), 3), "skipped": bool(self.skipped),
                "ok": bool(self.ok), "diagnosis": self.diagnosis}

    def itk_transform_text(self) -> str:
        """The affine as an ITK/ANTs transform file (LPS, atlas -> scan), e.g. for
        ``antsApplyTransforms -r atlas.nii.gz -i scan.nii.gz -t <scan>_affine.txt``."""
        lps = LPS_FROM_RAS @ self.atlas_to_scan_world @ LPS_FROM_RAS
        parameters = [*lps[:3, :3].ravel(), *lps[:3, 3]]
        return ("#Insight Transform File V1.0\n#Transform 0\n"
                "Transform: AffineTransform_double_3_3\n"
                f"Parameters: {' '.join(repr(float(p)) for p in parameters)}\n"
                "FixedParameters: 0 0 0\n")


def failure_message(scan: data.Volume, alignment: Alignment) -> str:
    """One line naming the likeliest cause of a failed alignment, from its figures and the
    scan's header."""
    figures = (f"brain overlap {alignment.brain_overlap:.2f}, min "
               f"{alignment.min_brain_overlap:.2f}; intensity correlation "
               f"{alignment.correlation or 0.0:.2f}, min {alignment.min_correlation:.2f}")
    if alignment.diagnosis == "contrast":
        relation = "anti-correlated" if (alignment.correlation or 0.0) <= -0.1 else "uncorrelated"
        return (f"{scan.path}: intensities {relation} with the atlas (r = "
                f"{alignment.correlation or 0.0:.2f}) although the brain outlines match (overlap "
                f"{alignment.brain_overlap:.2f}): a T2-weighted or inverted-contrast scan? LT-Net "
                f"expects the atlas's contrast (T1-weighted); the alignment is likely right, the "
                f"segmentation less accurate (flagged: diagnosis 'contrast')")
    if scan.header_conflict is not None:
        cause = (f"{scan.header_conflict.describe()}, the likeliest cause; "
                 f"{scan.header_conflict.fix(scan.path)}")
    elif alignment.brain_overlap >= alignment.min_brain_overlap:
        cause = ("the brain outlines match but the anatomy does not line up: axes flipped or "
                 "swapped in the header orientation?")
    else:
        cause = "check the header orientation (and that the scan is a whole, skull-stripped brain)"
    return (f"{scan.path}: alignment to the atlas looks wrong ({figures}): {cause}; its "
            f"segmentation is likely bad (flagged: diagnosis 'orientation')")


def resample_voxels(values: np.ndarray, output_to_input: np.ndarray, output_shape,
                    order: int) -> np.ndarray:
    """``values`` read at ``output_to_input`` (4x4, output voxel -> input voxel) of every voxel of
    an ``output_shape`` grid: linear (``order`` 1) or nearest (0), 0 outside the input. ITK's
    resampler (SimpleITK), threaded: the same values as ``scipy.ndimage.affine_transform`` with
    ``prefilter=False`` at a ninth of its time for a 256³ scan. The result has the input's memory
    order (C or Fortran), so that neither way pays a transposing copy."""
    import SimpleITK as sitk

    values = np.asarray(values)
    matrix = np.asarray(output_to_input, float)
    # SimpleITK's index (x, y, z) runs over a C-ordered array's axes in reverse. A Fortran-ordered
    # array, transposed (a view), is C-ordered with its axes reversed: the map applies as it is. A
    # C-ordered one goes in as it is, with the map's axes reversed. Neither is copied.
    fortran = values.flags["F_CONTIGUOUS"] and not values.flags["C_CONTIGUOUS"]
    if fortran:
        values, size = values.T, tuple(output_shape)
    else:
        values, size = np.ascontiguousarray(values), tuple(output_shape)[::-1]
        matrix = _REVERSED_AXES @ matrix @ _REVERSED_AXES
    image = sitk.GetImageFromArray(values)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    reference = sitk.Image([int(s) for s in size], image.GetPixelID())
    resampled = sitk.Resample(image, reference, transform,
                              sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor, 0)
    resampled = sitk.GetArrayFromImage(resampled)
    return resampled.T if fortran else resampled


_REVERSED_AXES = np.eye(4)[[2, 1, 0, 3]]  # voxel (i, j, k) <-> (k, j, i)


def resample_onto(volume: data.Volume, affine: np.ndarray, shape, order: int,
                  world_transform: np.ndarray = None) -> data.Volume:
    """``volume`` resampled onto the grid (``affine``, ``shape``), optionally moved by the RAS
    ``world_transform`` (new world point -> old world point): linear (``order=1``) for scans,
    nearest (``order=0``) for label maps. Used to make scanner-like variants of a scan."""
    world_transform = np.eye(4) if world_transform is None else np.asarray(world_transform, float)
    matrix = np.linalg.inv(volume.affine) @ world_transform @ np.asarray(affine, float)
    values = ndimage.affine_transform(volume.data, matrix[:3, :3], offset=matrix[:3, 3],
                                      output_shape=tuple(int(s) for s in shape), order=order,
                                      mode="constant", cval=0, prefilter=False)
    return data.Volume(data=values.astype(volume.data.dtype), affine=np.asarray(affine, float),
                       path=volume.path)


def on_atlas_grid(atlas: data.Volume, scan: data.Volume) -> bool:
    """Same shape and header affine: the scan was aligned and resampled already."""
    return (tuple(scan.shape) == tuple(atlas.shape) and
            float(np.max(np.abs(np.asarray(atlas.affine) - np.asarray(scan.affine))))
            <= data.AFFINE_TOLERANCE)


def identity(atlas: data.Volume, scan: data.Volume) -> Alignment:
    return Alignment(atlas_to_scan_world=scan.affine @ np.linalg.inv(atlas.affine),
                     atlas_affine=np.asarray(atlas.affine, float),
                     scan_affine=np.asarray(scan.affine, float), atlas_shape=atlas.shape,
                     scan_shape=scan.shape, skipped=True)


# ------------------------------------------------------------------------------ coarse images
def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _block_average(values: np.ndarray, factors) -> np.ndarray:
    """Mean over non-overlapping blocks (the partial blocks at the far ends are dropped)."""
    shape = [s // f * f for s, f in zip(values.shape, factors)]
    values = values[:shape[0], :shape[1], :shape[2]]
    return values.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1],
                          shape[2] // factors[2], factors[2]).mean(axis=(1, 3, 5))


def coarse_grid(volume: data.Volume, spacing_mm: float):
    """(values, affine) of the volume block-averaged to voxels of about ``spacing_mm``."""
    factors = [max(1, int(round(spacing_mm / z))) for z in _voxel_sizes(volume.affine)]
    factors = [min(f, max(1, s // 8)) for f, s in zip(factors, volume.shape)]  # keep >= 8 voxels
    values = _block_average(np.asarray(volume.data, np.float32), factors).astype(np.float32)
    # Coarse voxel i is the centre of block i: fine index f*i + (f-1)/2.
    scale = np.diag([*factors, 1.0])
    scale[:3, 3] = [(f - 1) / 2 for f in factors]
    return values, np.asarray(volume.affine, float) @ scale


def _to_sitk(values: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    lps = LPS_FROM_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    return image


def normalized(volume: data.Volume) -> data.Volume:
    """The volume with robustly normalised intensities (``ltnet_tf.io.intensity``): the registration
    metric, the tissue masks and the correlation see [0, 1] with the background at 0, so a few
    extreme voxels cannot squeeze the brain into one or two histogram bins."""
    return dataclasses.replace(volume, data=volume.normalized_data())


class AtlasAligner:
    """Aligns scans to one atlas; the atlas's coarse image is prepared once."""

    def __init__(self, atlas: data.Volume, settings: AlignmentSettings = AlignmentSettings()):
        self.atlas = atlas
        self.settings = settings
        self._atlas_values, self._atlas_coarse_affine = coarse_grid(normalized(atlas),
                                                                    settings.spacing_mm)
        self._atlas_mask = tissue_mask(self._atlas_values)

    def check_brain(self, scan: data.Volume, values=None, affine=None) -> float:
        """The scan's tissue volume in ml; a ``data.DataError`` naming the likeliest cause when it
        cannot be a skull-stripped brain (``plausibility.check_brain_size``). ``values``: its
        normalised coarse image on the grid ``affine``, when the caller has it."""
        return plausibility.check_brain_size(scan, self.settings.min_tissue_ml,
                                             self.settings.max_tissue_ml, values, affine)

    def align(self, scan: data.Volume, force: bool = False, check_size: bool = True) -> Alignment:
        """The affine taking the atlas grid to the scan; identity for a scan on the atlas grid.
        ``check_size``: refuse a scan that is no skull-stripped brain (``check_brain``); off for
        a scan whose brain mask was checked already (``ltnet_tf.preprocessing``)."""
        if not force and on_atlas_grid(self.atlas, scan):
            return identity(self.atlas, scan)
        import SimpleITK as sitk

        start = time.time()
        settings = self.settings
        scan_values, scan_coarse_affine = coarse_grid(normalized(scan), settings.spacing_mm)
        if check_size:
            self.check_brain(scan, scan_values, scan_coarse_affine)
        fixed = _to_sitk(self._atlas_values, self._atlas_coarse_affine)
        moving = _to_sitk(scan_values, scan_coarse_affine)
        start_transform = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid, _ = self._register(fixed, moving, start_transform, settings.rigid_iterations,
                                  shrink=[2, 1], sigmas_mm=[2 * settings.spacing_mm,
                                                            settings.spacing_mm])
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine, metric = self._register(fixed, moving, affine, settings.affine_iterations,
                                        shrink=[1], sigmas_mm=[0.0])
        lps = np.eye(4)
        matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
        center = np.asarray(affine.GetCenter())
        lps[:3, :3] = matrix
        lps[:3, 3] = np.asarray(affine.GetTranslation()) + center - matrix @ center
        alignment = Alignment(atlas_to_scan_world=LPS_FROM_RAS @ lps @ LPS_FROM_RAS,
                              atlas_affine=np.asarray(self.atlas.affine, float),
                              scan_affine=np.asarray(scan.affine, float),
                              atlas_shape=tuple(self.atlas.shape), scan_shape=tuple(scan.shape),
                              mutual_information=-float(metric),
                              min_brain_overlap=settings.min_brain_overlap,
                              min_correlation=settings.min_correlation,
                              max_contrast_correlation=settings.max_contrast_correlation)
        alignment.brain_overlap, alignment.correlation = self._quality(alignment, scan_values,
                                                                       scan_coarse_affine)
        alignment.seconds = time.time() - start
        if not alignment.ok:
            logging.warning("%s", failure_message(scan, alignment))
        return alignment

    def _register(self, fixed, moving, transform, iterations, shrink, sigmas_mm):
        import SimpleITK as sitk

        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(self.settings.histogram_bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(self.settings.sampling_fraction, seed=1)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
            gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel(sigmas_mm)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(transform, inPlace=True)
        # The metric's threader follows ITK's global default, not the method's own thread count.
        threads = self.settings.registration_threads
        previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        if threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            method.Execute(fixed, moving)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
        return transform, method.GetMetricValue()

    def _quality(self, alignment: Alignment, scan_values, scan_coarse_affine) -> tuple:
        """(brain overlap, intensity correlation) of the aligned scan with the atlas on the coarse
        atlas grid: the Dice of the tissue masks, and the correlation of the intensities inside
        the atlas's mask."""
        coarse_to_coarse = (np.linalg.inv(scan_coarse_affine) @ alignment.atlas_to_scan_world
                            @ self._atlas_coarse_affine)

        def moved(values):
            return ndimage.affine_transform(values, coarse_to_coarse[:3, :3],
                                            offset=coarse_to_coarse[:3, 3],
                                            output_shape=self._atlas_values.shape, order=1, cval=0)

        moved_mask = moved(tissue_mask(scan_values).astype(np.float32)) > 0.5
        total = int(moved_mask.sum()) + int(self._atlas_mask.sum())
        overlap = 2.0 * float(np.logical_and(moved_mask, self._atlas_mask).sum()) / total
        inside = self._atlas_mask
        correlation = float(np.corrcoef(moved(scan_values)[inside], self._atlas_values[inside])[0, 1])
        return overlap, (correlation if np.isfinite(correlation) else 0.0)
