"""Resampling a volume's voxels onto another grid through an affine voxel map: the aligned scan
onto the atlas grid (ITK's threaded resampler), and scanner-like variants of a scan for tests and
benchmarks (SciPy)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ltnet_tf.io import volumes as data


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
