"""A synthetic one-shot data set (atlas + deformed scans) so the method can be tried with no download.

The atlas is a brain-like phantom: an ellipsoidal head (scalp, skull, CSF) around a brain with a folded
cortex shell, white matter and paired deep structures labelled with FreeSurfer IDs. Each scan is the
atlas deformed by a random smooth displacement field and given its own contrast, bias field and
noise, so labels only line up after deformable registration with a contrast-robust similarity.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from ltnet_tf.io.volumes import save_nifti

# Labelled structures with FreeSurfer IDs: name -> (label ID, centre, radii, intensity). Centres and
# radii are fractions of the half-extent of each axis (axis 0 left-right, 1 posterior-anterior,
# 2 inferior-superior); a positive axis-0 coordinate is the left hemisphere (the affine flips it).
DEEP_STRUCTURES = {
    "left_caudate": (11, (0.17, 0.22, 0.12), (0.09, 0.18, 0.12), 0.62),
    "right_caudate": (50, (-0.17, 0.22, 0.12), (0.09, 0.18, 0.12), 0.62),
    "left_thalamus": (10, (0.15, -0.12, -0.02), (0.13, 0.16, 0.13), 0.70),
    "right_thalamus": (49, (-0.15, -0.12, -0.02), (0.13, 0.16, 0.13), 0.70),
    "left_hippocampus": (17, (0.34, -0.12, -0.30), (0.11, 0.24, 0.11), 0.56),
    "right_hippocampus": (53, (-0.34, -0.12, -0.30), (0.11, 0.24, 0.11), 0.56),
    "left_ventricle": (4, (0.08, 0.05, 0.15), (0.07, 0.30, 0.11), 0.15),
    "right_ventricle": (43, (-0.08, 0.05, 0.15), (0.07, 0.30, 0.11), 0.15),
}
WHITE_MATTER, CORTEX = 2, 3
# Tissue classes: index into the intensity table; the label ID of the non-brain ones is 0.
TISSUES = (["background", "scalp", "skull", "csf", "cortex", "white_matter"] + list(DEEP_STRUCTURES))
TISSUE_LABEL_IDS = np.array([0, 0, 0, 0, CORTEX, WHITE_MATTER]
                            + [s[0] for s in DEEP_STRUCTURES.values()], dtype=np.int32)
TISSUE_INTENSITIES = np.array([0.0, 0.45, 0.08, 0.2, 0.5, 0.82]
                              + [s[3] for s in DEEP_STRUCTURES.values()], dtype=np.float32)
DEMO_LABEL_IDS = sorted({0, *TISSUE_LABEL_IDS.tolist()})


def demo_affine(shape, voxel_mm: float = 1.0) -> np.ndarray:
    """``voxel_mm`` voxels, axis 0 flipped (so index increases to the left), the grid centred."""
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2 * voxel_mm
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = [centre[0], -centre[1], -centre[2]]
    return affine


def _normalised_coordinates(shape):
    """Voxel coordinates as fractions of each axis's half-extent, 0 at the grid centre."""
    axes = [(np.arange(s, dtype=np.float32) - (s - 1) / 2) / (s / 2) for s in shape]
    return np.meshgrid(*axes, indexing="ij")


def phantom_tissues(shape) -> np.ndarray:
    """The atlas anatomy as a map of tissue-class indices (see ``TISSUES``)."""
    x, y, z = _normalised_coordinates(shape)
    radius = np.sqrt((x / 0.95) ** 2 + (y / 0.95) ** 2 + (z / 0.9) ** 2)
    # Gyri: a wavy outer and inner cortical boundary, so the cortex is not a plain shell.
    folds = 0.035 * np.sin(9 * np.arctan2(y, x)) * np.cos(7 * np.arctan2(z, np.hypot(x, y)))
    tissues = np.zeros(shape, dtype=np.int8)
    tissues[radius < 0.96] = TISSUES.index("scalp")
    tissues[radius < 0.88] = TISSUES.index("skull")
    tissues[radius < 0.80] = TISSUES.index("csf")
    tissues[radius < 0.76 + folds] = TISSUES.index("cortex")
    tissues[radius < 0.60 + 1.5 * folds] = TISSUES.index("white_matter")
    for name, (_, centre, radii, _) in DEEP_STRUCTURES.items():
        inside = sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radii)) < 1
        tissues[inside] = TISSUES.index(name)
    return tissues


def _bias_field(rng, shape, strength=0.15) -> np.ndarray:
    """A smooth multiplicative intensity inhomogeneity (low-order polynomial in the exponent)."""
    x, y, z = _normalised_coordinates(shape)
    linear = rng.normal(0, strength, 3)
    quadratic = rng.normal(0, strength / 2, 3)
    return np.exp(linear[0] * x + linear[1] * y + linear[2] * z
                  + quadratic[0] * x * y + quadratic[1] * y * z + quadratic[2] * x * z)


def _render(clean_image, rng, noise_sd) -> np.ndarray:
    """Bias field and Gaussian noise on a noise-free image; float32, non-negative."""
    image = clean_image * _bias_field(rng, clean_image.shape)
    image = image + rng.normal(0, noise_sd, clean_image.shape)
    return np.clip(image, 0, None).astype(np.float32)


def _clean_image(tissues, intensities) -> np.ndarray:
    """Piecewise-constant intensities, slightly blurred as a scanner's partial-volume effect."""
    return ndimage.gaussian_filter(intensities[tissues].astype(np.float32), sigma=0.6)


def random_displacement(rng, shape, max_displacement, smoothness=8.0) -> np.ndarray:
    """A smooth random displacement field [3, D, H, W] in voxels, largest length ``max_displacement``."""
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                              smoothness, mode="reflect") for _ in shape])
    length = np.sqrt(np.sum(field ** 2, axis=0)).max()
    return field * (max_displacement / max(float(length), 1e-6))


def random_affine_displacement(rng, shape, linear_sd=0.05, max_shift=1.5) -> np.ndarray:
    """The displacement [3, D, H, W] of a small random affine map about the grid centre: the residual
    misalignment that affine pre-alignment leaves, which moves every structure a little."""
    matrix = rng.normal(0, linear_sd, (3, 3))
    shift = rng.uniform(-max_shift, max_shift, 3)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in shape],
                                indexing="ij"))
    return (np.einsum("ij,j...->i...", matrix, grid) + shift[:, None, None, None]).astype(np.float32)


def _warp(volume, displacement, order) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in volume.shape], indexing="ij")
    coordinates = [g + d for g, d in zip(grid, displacement)]
    return ndimage.map_coordinates(volume, coordinates, order=order, mode="constant", cval=0)


def make_demo_dataset(out_dir, *, n_scans: int = 6, shape=(48, 56, 64), seed: int = 0,
                      max_displacement=(3.0, 5.0), contrast_change: float = 0.15,
                      voxel_mm: float = 1.0) -> dict:
    """Write ``atlas.nii.gz``, ``atlas_labels.nii.gz``, ``images/scan_XX.nii.gz`` and
    ``labels/scan_XX.nii.gz`` (labels for evaluation only) under ``out_dir``; return their paths.

    ``max_displacement`` is the range of each scan's largest displacement in voxels and
    ``contrast_change`` the largest relative change of a tissue's intensity; same seed, same files.
    ``voxel_mm``: voxel size in the headers (e.g. 6 mm makes a 24³ grid head-sized in world units).
    """
    shape = tuple(int(s) for s in shape)
    images_dir, labels_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "labels")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    affine = demo_affine(shape, voxel_mm)

    tissues = phantom_tissues(shape)
    atlas_labels = TISSUE_LABEL_IDS[tissues]
    atlas_rng = np.random.default_rng([seed, 0])
    atlas_image = _render(_clean_image(tissues, TISSUE_INTENSITIES), atlas_rng, noise_sd=0.02)
    paths = {"atlas": os.path.join(out_dir, "atlas.nii.gz"),
             "atlas_labels": os.path.join(out_dir, "atlas_labels.nii.gz"),
             "images_dir": images_dir, "labels_dir": labels_dir, "images": [], "labels": []}
    save_nifti(atlas_image, affine, paths["atlas"])
    save_nifti(atlas_labels, affine, paths["atlas_labels"])

    for index in range(n_scans):
        rng = np.random.default_rng([seed, 1 + index])
        intensities = TISSUE_INTENSITIES * (1 + rng.uniform(-contrast_change, contrast_change,
                                                             len(TISSUES))).astype(np.float32)
        intensities[0] = 0.0
        displacement = (random_affine_displacement(rng, shape)
                        + random_displacement(rng, shape, rng.uniform(*max_displacement)))
        scan_image = _render(_warp(_clean_image(tissues, intensities), displacement, order=1), rng,
                             noise_sd=rng.uniform(0.015, 0.035))
        scan_labels = _warp(atlas_labels, displacement, order=0)
        name = f"scan_{index:02d}.nii.gz"
        paths["images"].append(os.path.join(images_dir, name))
        paths["labels"].append(os.path.join(labels_dir, name))
        save_nifti(scan_image, affine, paths["images"][-1])
        save_nifti(scan_labels, affine, paths["labels"][-1])
    return paths
