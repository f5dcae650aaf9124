"""The scans of ``bench.contrasts``: validation scans on their own grids with their label maps,
and broken inputs made from a scan (the calibration cases of the alignment's diagnosis).
"""
from __future__ import annotations

import os

import numpy as np
from scipy import ndimage


def load_case(data_dir: str, name: str) -> tuple:
    """(scan, label map) of a native subject (sub-XX: ``native/``, .mgz) or a MICCAI 2012 one
    (``miccai2012/``), on its own grid."""
    from ltnet_tf.io import volumes

    folder, extension = (("native", ".mgz") if name.startswith("sub")
                         else ("miccai2012", ".nii.gz"))
    return (volumes.load_scan(os.path.join(data_dir, folder, "images", name + extension)),
            volumes.load_label_map(os.path.join(data_dir, folder, "labels", name + extension)))


def broken_inputs(scan) -> dict:
    """{name: volume} made from ``scan``: its header upside down, two voxel axes swapped under the
    same header, a smooth noise volume of brain size (box-shaped), and smooth noise inside the
    scan's brain (as the alignment's calibration had them)."""
    from ltnet_tf.io import volumes

    upside_down = scan.affine @ np.diag([1.0, -1.0, -1.0, 1.0])
    upside_down[:3, 3] += scan.affine[:3, :3] @ (np.asarray(scan.shape) - 1) * [0, 1, 1]
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.random(scan.shape, np.float32), 8)
    centre, half = np.asarray(scan.shape) // 2, np.asarray([55, 70, 55])
    box = np.zeros(scan.shape, np.float32)
    box[tuple(slice(max(0, c - h), c + h) for c, h in zip(centre, half))] = 1.0
    brain = scan.data > 0
    return {
        "upside-down header": volumes.Volume(scan.data, upside_down, "upside_down"),
        "axes swapped": volumes.Volume(np.ascontiguousarray(np.swapaxes(scan.data, 0, 1)),
                                       scan.affine, "axes_swapped"),
        "noise volume": volumes.Volume(np.where(ndimage.gaussian_filter(box, 3) > 0.5, noise,
                                                0).astype(np.float32), scan.affine, "noise"),
        "brain-shaped noise": volumes.Volume(np.where(brain, ndimage.gaussian_filter(
            rng.random(scan.shape, np.float32), 3), 0).astype(np.float32), scan.affine,
            "brain_noise"),
    }
