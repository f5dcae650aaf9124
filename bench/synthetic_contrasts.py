"""Other MR contrasts made from a skull-stripped T1 scan, and smooth bias fields: test cases.

Two kinds of T2-, FLAIR- and PD-like scans, reported separately by ``bench.contrasts``:

**From the label map** (``from_labels``). Every brain voxel (scan > 0) gets a tissue class from the
FreeSurfer label map (voxels without a listed label count as CSF: extracerebral CSF):

    class          labels                                          T2-like  FLAIR-like  PD-like
    white matter   2 41 7 46 16 28 60 77 85 251-255                  0.30      0.50       0.60
    cortex         3 42 8 47                                         0.60      0.75       0.80
    deep grey      10 11 12 13 17 18 26 49-54 58 62 30              0.50      0.65       0.75
    CSF            4 5 14 15 24 31 43 44 63 72 (and unlabelled)      1.00      0.08       0.90

(fractions of the brightest tissue; FLAIR: fluid suppressed, grey brighter than white; T2: CSF
brightest, white darkest; PD: little contrast, CSF and grey bright). Inside each class the T1's own
texture is kept at half its relative amplitude, as this benchmark always made them:
``new = level * (1 + 0.5 * (t1 / mean of t1 over the class - 1))``. Then a Gaussian blur of sigma
0.6 voxel (partial volumes at tissue borders, as acquisition gives). Such a scan carries the labels'
boundaries exactly: a method that fits intensities per structure recovers them.

**From the T1's intensities alone** (``from_intensities``, no labels). The T1's intensities inside
the brain are normalised robustly (``ltnet_tf.io.intensity``: 0.5-99.5 percentiles to [0, 1]);
three landmarks, the centres of CSF, grey and white matter (c < g < w), come from a 3-class k-means
of those intensities; the new intensity is a piecewise-linear map of the normalised T1 through

    T2-like     (0, 1.00) (c, 1.00) (g, 0.55) (w, 0.30) (1, 0.25)   decreasing
    FLAIR-like  (0, 0.05) (c, 0.10) (g, 0.85) (w, 0.60) (1, 0.55)   CSF dark, grey brightest
    PD-like     (0, 0.90) (c, 0.90) (g, 0.80) (w, 0.65) (1, 0.62)   flattened, decreasing

so partial volumes and every texture of the T1 pass through the same map.

Then both kinds get a smooth multiplicative bias field of +-20 % (``bias_field``, seeded) and
Rician noise of sigma 0.02 of the brightest level: |value + n1 + i n2| with n1, n2 ~ N(0, 0.02²)
(seed fixed per scan and contrast); 0 outside the brain.

Bias fields (``bias_field``): a 4x4x4 grid of uniform random values in [-1, 1] (seeded),
interpolated by cubic B-splines onto the scan's grid, scaled so its largest absolute value inside
``inside`` is 1, times ``amplitude``, plus 1.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

CONTRASTS = ("t2", "flair", "pd")
KINDS = ("intensities", "labels")
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
# Values at (0, CSF, grey, white, 1) of the normalised T1.
INTENSITY_MAPS = {
    "t2": (1.00, 1.00, 0.55, 0.30, 0.25),
    "flair": (0.05, 0.10, 0.85, 0.60, 0.55),
    "pd": (0.90, 0.90, 0.80, 0.65, 0.62),
}
TEXTURE = 0.5
BLUR_VOXELS = 0.6
NOISE = 0.02
BIAS = 0.20


def tissue_classes(labels: np.ndarray, brain: np.ndarray) -> dict:
    """{class: bool mask}; brain voxels without a listed label join 'csf'."""
    classes = {name: np.isin(labels, ids) & brain for name, ids in TISSUE_LABELS.items()}
    listed = np.logical_or.reduce(list(classes.values()))
    classes["csf"] = classes["csf"] | (brain & ~listed)
    return classes


def tissue_landmarks(values: np.ndarray, iterations: int = 50) -> tuple:
    """(CSF, grey, white) centres of a 3-class k-means of ``values`` (1-D, normalised T1
    intensities of the brain): the product's own (``registration.contrast.tissue_centres``)."""
    from ltnet_tf.registration.contrast import tissue_centres

    return tuple(float(c) for c in tissue_centres(values, iterations))


def from_labels(t1: np.ndarray, labels: np.ndarray, contrast: str) -> np.ndarray:
    """T1 [grid] (0 outside the brain), its label map -> the noiseless, unbiased scan in
    ``contrast`` (see the module docstring), float32."""
    t1 = np.asarray(t1, np.float32)
    brain = t1 > 0
    out = np.zeros(t1.shape, np.float32)
    for name, inside in tissue_classes(labels, brain).items():
        if inside.any():
            relative = t1[inside] / (float(t1[inside].mean()) or 1.0)
            out[inside] = CONTRAST_LEVELS[contrast][name] * (1 + TEXTURE * (relative - 1))
    return np.where(brain, ndimage.gaussian_filter(out, BLUR_VOXELS), 0.0).astype(np.float32)


def from_intensities(t1: np.ndarray, contrast: str) -> tuple:
    """T1 [grid] (0 outside the brain) -> (the noiseless, unbiased scan in ``contrast``, float32,
    the landmarks (CSF, grey, white) used); no labels (see the module docstring)."""
    from ltnet_tf.io import intensity

    t1 = np.asarray(t1, np.float32)
    brain = t1 > 0
    normalised = intensity.normalize_array(t1)
    landmarks = tissue_landmarks(normalised[brain][::7])
    mapped = np.interp(normalised, (0.0, *landmarks, 1.0), INTENSITY_MAPS[contrast])
    return np.where(brain, mapped, 0.0).astype(np.float32), landmarks


def remap_contrast(t1: np.ndarray, labels: np.ndarray, contrast: str, seed: int = 0) -> np.ndarray:
    """The label-made ``contrast`` of ``from_labels`` with Gaussian noise of sigma ``NOISE`` and no
    bias field, float32, 0 outside the brain: the recipe of ``bench.heads``'s contrast part and
    of ``bench.degradations``' contrast copies (their committed results were made with it)."""
    brain = np.asarray(t1) > 0
    noise = np.random.default_rng(seed).normal(0.0, NOISE, brain.shape).astype(np.float32)
    clean = from_labels(t1, labels, contrast)
    return np.where(brain, np.maximum(clean + noise, 0.0), 0.0).astype(np.float32)


def acquired(clean: np.ndarray, brain: np.ndarray, seed: int) -> np.ndarray:
    """``clean`` times a bias field of +-``BIAS``, with Rician noise of sigma ``NOISE`` (of the
    brightest level, 1), 0 outside ``brain``."""
    biased = clean * bias_field(clean.shape, brain, BIAS, seed=seed)
    rng = np.random.default_rng(seed)
    real = biased + rng.normal(0.0, NOISE, clean.shape).astype(np.float32)
    imaginary = rng.normal(0.0, NOISE, clean.shape).astype(np.float32)
    return np.where(brain, np.hypot(real, imaginary), 0.0).astype(np.float32)


def make_contrast(t1: np.ndarray, labels, contrast: str, kind: str, seed: int) -> np.ndarray:
    """The T1 [grid] remapped to ``contrast`` ('t2', 'flair', 'pd') of ``kind`` ('labels': needs
    ``labels``; 'intensities'), with bias and Rician noise; float32, 0 outside the brain."""
    brain = np.asarray(t1) > 0
    clean = (from_labels(t1, labels, contrast) if kind == "labels"
             else from_intensities(t1, contrast)[0])
    return acquired(clean, brain, seed)


def bias_field(shape, inside: np.ndarray, amplitude: float = 0.25, seed: int = 0) -> np.ndarray:
    """A smooth multiplicative field [shape] spanning 1 +- ``amplitude`` inside ``inside``."""
    coarse = np.random.default_rng(seed).uniform(-1.0, 1.0, (4, 4, 4))
    smooth = ndimage.zoom(coarse, np.asarray(shape, float) / 4.0, order=3)[
        :shape[0], :shape[1], :shape[2]]
    smooth = smooth / np.abs(smooth[inside]).max()
    return (1.0 + amplitude * smooth).astype(np.float32)
