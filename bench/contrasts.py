"""Other MR contrasts made from a T1 scan and its label map, and smooth bias fields: test cases.

Per-tissue intensity remapping (``remap_contrast``). Every brain voxel gets a tissue class from
the label map (FreeSurfer IDs; voxels inside the scan's brain, scan > 0, without a label count as
CSF: extracerebral CSF):

    class          labels                                          T2-like  FLAIR-like  PD-like
    white matter   2 41 7 46 16 28 60 77 85 251-255                  0.30      0.50       0.60
    cortex         3 42 8 47                                         0.60      0.75       0.80
    deep grey      10 11 12 13 17 18 26 49-54 58 62 30              0.50      0.65       0.75
    CSF            4 5 14 15 24 31 43 44 63 72 (and unlabelled)      1.00      0.08       0.90

(as fractions of the brightest tissue; FLAIR: fluid suppressed, grey brighter than white; T2:
CSF brightest, white darkest; PD: little contrast, CSF and grey bright.) Inside each class the T1
texture is kept at half its relative amplitude: ``new = level * (1 + 0.5 * (t1 / mean_class - 1))``,
so the new contrast is not piecewise constant. Then a Gaussian blur of sigma 0.6 voxel (partial
volumes at tissue borders, as acquisition gives), Gaussian noise of standard deviation 0.02 of the
brightest level inside the brain (seed fixed per scan and contrast), negatives clipped to 0, and 0
outside the brain.

Bias fields (``bias_field``): a 4x4x4 grid of uniform random values in [-1, 1] (seeded),
interpolated by cubic B-splines onto the scan's grid, scaled so its largest absolute value inside
the head is 1, times ``amplitude`` (0.25: the field spans 0.75-1.25), plus 1; the scan is
multiplied by it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

TISSUE_LABELS = {
    "white": (2, 41, 7, 46, 16, 28, 60, 77, 85, 251, 252, 253, 254, 255),
    "cortex": (3, 42, 8, 47),
    "deep_grey": (10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58, 62, 30),
    "csf": (4, 5, 14, 15, 24, 31, 43, 44, 63, 72),
}
CONTRAST_LEVELS = {
    "t2": {"white": 0.30, "cortex": 0.60, "deep_grey": 0.50, "csf": 1.00},
    "flair": {"white": 0.50, "cortex": 0.75, "deep_grey": 0.65, "csf": 0.08},
    "pd": {"white": 0.60, "cortex": 0.80, "deep_grey": 0.75, "csf": 0.90},
}
TEXTURE = 0.5
BLUR_VOXELS = 0.6
NOISE = 0.02


def tissue_classes(labels: np.ndarray, brain: np.ndarray) -> dict:
    """{class: bool mask}; brain voxels without a listed label join 'csf'."""
    classes = {name: np.isin(labels, ids) & brain for name, ids in TISSUE_LABELS.items()}
    listed = np.logical_or.reduce(list(classes.values()))
    classes["csf"] = classes["csf"] | (brain & ~listed)
    return classes


def remap_contrast(t1: np.ndarray, labels: np.ndarray, contrast: str, seed: int = 0) -> np.ndarray:
    """T1 scan [grid] (skull-stripped: 0 outside the brain), its label map [grid] -> the scan in
    ``contrast`` ('t2', 'flair', 'pd'), float32, 0 outside the brain. See the module docstring."""
    t1 = np.asarray(t1, np.float32)
    brain = t1 > 0
    out = np.zeros(t1.shape, np.float32)
    for name, inside in tissue_classes(labels, brain).items():
        if not inside.any():
            continue
        mean = float(t1[inside].mean()) or 1.0
        out[inside] = CONTRAST_LEVELS[contrast][name] * (1 + TEXTURE * (t1[inside] / mean - 1))
    out = ndimage.gaussian_filter(out, BLUR_VOXELS)
    noise = np.random.default_rng(seed).normal(0.0, NOISE, t1.shape).astype(np.float32)
    return np.where(brain, np.maximum(out + noise, 0.0), 0.0).astype(np.float32)


def bias_field(shape, inside: np.ndarray, amplitude: float = 0.25, seed: int = 0) -> np.ndarray:
    """A smooth multiplicative field [shape] spanning 1 +- ``amplitude`` inside ``inside``."""
    coarse = np.random.default_rng(seed).uniform(-1.0, 1.0, (4, 4, 4))
    smooth = ndimage.zoom(coarse, np.asarray(shape, float) / 4.0, order=3)[
        :shape[0], :shape[1], :shape[2]]
    smooth = smooth / np.abs(smooth[inside]).max()
    return (1.0 + amplitude * smooth).astype(np.float32)
