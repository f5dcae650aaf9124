"""Degraded copies of a scan and its label map: the inputs users actually send, each a real failure
mode, made on the scan's own grid so that the reference labels follow every change of grid.

    clean          the scan as it is
    thick_slices   slabs of 3-8 voxels along the superior-inferior axis averaged into one thick
                   slice (partial volumes, as a 2D acquisition gives); labels: the slab's centre
                   slice; the header's voxel size along that axis ×3-8
    noise          Rician noise (magnitude of complex Gaussian noise), sigma 3-25 % of the brain's
                   median intensity, inside the brain (the scans are skull-stripped)
    ghosts         rigid motion during part of the acquisition: a share (20-60 %) of the k-space
                   lines along the anterior-posterior (phase-encoding) axis shifted by 2-10
                   voxels, the magnitude image then masked to the brain as skull stripping would
    crop           a field of view that cuts the brain: its top or bottom 15-60 mm removed from
                   the grid (image and labels)
    lesion         a T1-hypointense ellipsoid (radii 8-30 mm, soft edge, textured) in the cerebral
                   white matter; the labels are kept (the anatomy is there, its appearance changed)
    bias           a smooth multiplicative field of ±20-60 % (``contrasts.bias_field``), not
                   corrected (predict.py corrects whole heads only, by default)
    contrast       T2-, FLAIR- or PD-like (``contrasts.remap_contrast``), by subject in turn
    orientation    a mislabelled header orientation: the superior-inferior or anterior-posterior
                   axis flipped, those two axes swapped, or the header rotated 20-60° about the
                   left-right axis (an oblique acquisition recorded as straight); the voxels
                   unchanged
    voxel_size     a wrong voxel size in the header: ×0.85 or ×1.08 on every axis, or ×0.75 or
                   ×1.25 on one (the voxels unchanged)
    combined       two of thick_slices, noise, ghosts, crop, lesion and bias, one after the other
    lr_flip        the left-right axis flipped in the header: a mirrored brain is still a
                   plausible brain, so no check without a reference can see it (scored apart)

Every parameter is drawn from ``numpy.random.default_rng(seed)``, so a (subject, degradation,
seed) always gives the same copy. ``python -m bench.degradations --out DIR`` writes the copies of
the data's subjects as NIfTI files, to segment them with predict.py.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from bench import contrasts

DEGRADATIONS = ("clean", "thick_slices", "noise", "ghosts", "crop", "lesion", "bias", "contrast",
                "orientation", "voxel_size", "combined")
COMBINABLE = ("thick_slices", "noise", "ghosts", "crop", "lesion", "bias")
UNDETECTABLE = ("lr_flip",)  # made and scored, kept out of the calibration's figures
CEREBRAL_WHITE_MATTER = (2, 41)


@dataclass
class Copy:
    """A scan [grid] float32, its label map [grid] int32 on the same grid, the grid's affine (4×4,
    voxel -> RAS mm), and what was done (``degradation``, ``parameters``)."""
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    degradation: str = "clean"
    parameters: dict = field(default_factory=dict)


def seed_of(subject: str, degradation: str, base: int = 0) -> int:
    """A fixed seed per (subject, degradation): the same copy on every machine and run."""
    return zlib.crc32(f"{subject}/{degradation}/{base}".encode()) & 0x7FFFFFFF


def degrade(name: str, image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
            seed: int, index: int = 0) -> Copy:
    """The copy ``name`` (``DEGRADATIONS`` or ``UNDETECTABLE``) of a skull-stripped scan (0
    outside the brain), its label map and affine; ``index``: the subject's number (which other
    contrast). Raises ValueError for an unknown name."""
    image = np.asarray(image, np.float32)
    labels = np.asarray(labels, np.int32)
    affine = np.asarray(affine, float)
    rng = np.random.default_rng(seed)
    makers = {"clean": lambda: Copy(image, labels, affine),
              "thick_slices": lambda: thick_slices(image, labels, affine, int(rng.integers(3, 9))),
              "noise": lambda: noise(image, labels, affine, float(rng.uniform(0.03, 0.25)), rng),
              "ghosts": lambda: ghosts(image, labels, affine, float(rng.uniform(0.2, 0.6)),
                                       float(rng.uniform(2.0, 10.0)), rng),
              "crop": lambda: crop(image, labels, affine, float(rng.uniform(15.0, 60.0)),
                                   bool(rng.integers(2))),
              "lesion": lambda: lesion(image, labels, affine, float(rng.uniform(8.0, 30.0)), rng),
              "bias": lambda: bias(image, labels, affine, float(rng.uniform(0.2, 0.6)),
                                   int(rng.integers(1 << 30))),
              "contrast": lambda: contrast(image, labels, affine, ("t2", "flair", "pd")[index % 3],
                                           int(rng.integers(1 << 30))),
              "orientation": lambda: orientation(
                  image, labels, affine, ("flip_si", "flip_ap", "swap_ap_si", "rotate")[
                      int(rng.integers(4))], float(rng.uniform(20.0, 60.0))),
              "voxel_size": lambda: voxel_size(image, labels, affine, int(rng.integers(4)), rng),
              "combined": lambda: combined(image, labels, affine, rng, index),
              "lr_flip": lambda: orientation(image, labels, affine, "flip_lr")}
    if name not in makers:
        raise ValueError(f"unknown degradation {name!r}: one of {', '.join(makers)}")
    made = makers[name]()
    made.degradation = name
    return made


def combined(image, labels, affine, rng, index: int) -> Copy:
    """Two of ``COMBINABLE``, in the order listed, each with its own drawn parameters."""
    first, second = sorted(rng.choice(len(COMBINABLE), 2, replace=False))
    parameters = {}
    for which in (first, second):
        name = COMBINABLE[which]
        made = degrade(name, image, labels, affine, int(rng.integers(1 << 30)), index)
        image, labels, affine = made.image, made.labels, made.affine
        parameters[name] = made.parameters
    return Copy(image, labels, affine, parameters=parameters)


# ------------------------------------------------------------------------------ axes
def axis_along(affine: np.ndarray, direction: str) -> int:
    """The voxel axis closest to the world's 'LR', 'AP' or 'SI' direction."""
    world = {"LR": 0, "AP": 1, "SI": 2}[direction]
    columns = np.abs(np.asarray(affine)[:3, :3]) / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(columns[world]))


def _voxel_map(affine: np.ndarray, matrix: np.ndarray, shape, new_shape=None) -> np.ndarray:
    """The header of a grid whose voxel v is the old voxel ``matrix @ v`` (4×4) — the image's
    world position moved so that the grid's centre stays where it was."""
    new_shape = shape if new_shape is None else new_shape
    moved = np.asarray(affine, float) @ matrix
    old_centre = affine @ np.r_[(np.asarray(shape) - 1) / 2.0, 1.0]
    new_centre = moved @ np.r_[(np.asarray(new_shape) - 1) / 2.0, 1.0]
    moved[:3, 3] += (old_centre - new_centre)[:3]
    return moved


# ------------------------------------------------------------------------------ the degradations
def thick_slices(image, labels, affine, slab: int) -> Copy:
    axis = axis_along(affine, "SI")
    count = image.shape[axis] // slab
    kept = [slice(None)] * 3
    kept[axis] = slice(0, count * slab)
    grouped = np.moveaxis(image[tuple(kept)], axis, 0)
    thick = grouped.reshape(count, slab, *grouped.shape[1:]).mean(1)
    centre = [slice(None)] * 3
    centre[axis] = slice(slab // 2, count * slab, slab)
    new_affine = np.asarray(affine, float).copy()
    new_affine[:3, axis] *= slab
    new_affine[:3, 3] += affine[:3, axis] * (slab - 1) / 2.0  # voxel 0: the first slab's centre
    return Copy(np.ascontiguousarray(np.moveaxis(thick, 0, axis)),
                np.ascontiguousarray(labels[tuple(centre)]), new_affine,
                parameters={"slice_mm": float(slab * np.linalg.norm(affine[:3, axis])),
                            "axis": axis})


def noise(image, labels, affine, level: float, rng) -> Copy:
    brain = image > 0
    sigma = level * float(np.median(image[brain]))
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    noisy = np.where(brain, np.sqrt(real * real + imaginary * imaginary), 0.0).astype(np.float32)
    return Copy(noisy, labels, affine, parameters={"sigma_of_median": round(level, 4)})


def ghosts(image, labels, affine, share: float, shift: float, rng) -> Copy:
    axis = axis_along(affine, "AP")
    size = image.shape[axis]
    frequencies = np.fft.fftfreq(size)
    moved_lines = rng.random(size) < share
    phase = np.where(moved_lines, np.exp(-2j * np.pi * frequencies * shift), 1.0)
    shape = [1, 1, 1]
    shape[axis] = size
    spectrum = np.fft.fft(image.astype(np.complex64), axis=axis) * phase.reshape(shape)
    ghosted = np.abs(np.fft.ifft(spectrum, axis=axis)).astype(np.float32)
    return Copy(np.where(image > 0, ghosted, 0.0).astype(np.float32), labels, affine,
                parameters={"moved_line_share": round(share, 3), "shift_voxels": round(shift, 2),
                            "axis": axis})


def crop(image, labels, affine, millimetres: float, top: bool) -> Copy:
    axis = axis_along(affine, "SI")
    spacing = float(np.linalg.norm(affine[:3, axis]))
    inside = np.flatnonzero((image > 0).any(axis=tuple(a for a in range(3) if a != axis)))
    superior_is_high = affine[2, axis] > 0
    cut = int(round(millimetres / spacing))
    from_high = top == superior_is_high
    kept = [slice(None)] * 3
    if from_high:
        kept[axis] = slice(0, int(inside[-1]) + 1 - cut)
        offset = 0
    else:
        kept[axis] = slice(int(inside[0]) + cut, image.shape[axis])
        offset = int(inside[0]) + cut
    new_affine = np.asarray(affine, float).copy()
    new_affine[:3, 3] += affine[:3, axis] * offset
    return Copy(np.ascontiguousarray(image[tuple(kept)]),
                np.ascontiguousarray(labels[tuple(kept)]), new_affine,
                parameters={"removed_mm": round(cut * spacing, 1),
                            "side": "top" if top else "bottom"})


def lesion(image, labels, affine, radius_mm: float, rng) -> Copy:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    white = np.isin(labels, CEREBRAL_WHITE_MATTER)
    depth = ndimage.distance_transform_edt(white, sampling=spacing)
    candidates = np.argwhere(depth >= min(radius_mm * 0.5, float(depth.max()) * 0.8))
    centre = candidates[int(rng.integers(len(candidates)))]
    radii = radius_mm * np.array([1.0, 0.8, 0.7])[rng.permutation(3)]
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    distance = np.sqrt(sum(((g - c) * s / r) ** 2 for g, c, s, r in
                           zip(grid, centre, spacing, radii)))
    weight = (1.0 / (1.0 + np.exp((distance - 1.0) / 0.08))).astype(np.float32)  # soft edge
    brain = image > 0
    ventricles = np.isin(labels, (4, 43)) & brain
    dark = float(np.median(image[ventricles])) if ventricles.any() else float(
        np.percentile(image[brain], 5))
    texture = 1.0 + 0.1 * rng.standard_normal(image.shape).astype(np.float32)
    lesioned = image * (1.0 - weight) + 1.2 * dark * texture * weight
    return Copy(np.where(brain, lesioned, 0.0).astype(np.float32), labels, affine,
                parameters={"radius_mm": round(radius_mm, 1),
                            "centre_voxel": [int(c) for c in centre],
                            "volume_ml": round(float(weight.sum() * np.prod(spacing)) / 1000, 1)})


def bias(image, labels, affine, amplitude: float, seed: int) -> Copy:
    brain = image > 0
    field_ = contrasts.bias_field(image.shape, brain, amplitude, seed)
    return Copy((image * field_).astype(np.float32), labels, affine,
                parameters={"amplitude": round(amplitude, 3)})


def contrast(image, labels, affine, name: str, seed: int) -> Copy:
    return Copy(contrasts.remap_contrast(image, labels, name, seed), labels, affine,
                parameters={"contrast": name})


def orientation(image, labels, affine, change: str, degrees: float = 0.0) -> Copy:
    """The header's voxel axes flipped (``flip_si``, ``flip_ap``, ``flip_lr``), swapped
    (``swap_ap_si``) or rotated by ``degrees`` about the left-right axis (``rotate``); the voxels
    as they are."""
    matrix = np.eye(4)
    parameters = {"change": change}
    if change in ("flip_si", "flip_ap", "flip_lr"):
        axis = axis_along(affine, change[-2:].upper())
        matrix[axis, axis] = -1.0
        matrix[axis, 3] = image.shape[axis] - 1
        new_affine = affine @ matrix
    elif change == "swap_ap_si":
        a, b = axis_along(affine, "AP"), axis_along(affine, "SI")
        matrix[[a, b]] = matrix[[b, a]]
        new_affine = _voxel_map(affine, matrix, image.shape)
    elif change == "rotate":
        angle = np.radians(degrees)
        world = np.eye(4)
        world[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        centre = affine @ np.r_[(np.asarray(image.shape) - 1) / 2.0, 1.0]
        shift, back = np.eye(4), np.eye(4)
        shift[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
        new_affine = back @ world @ shift @ affine
        parameters["degrees"] = round(degrees, 1)
    else:
        raise ValueError(f"unknown orientation change {change!r}")
    return Copy(image, labels, new_affine, parameters=parameters)


def voxel_size(image, labels, affine, choice: int, rng) -> Copy:
    """The header's voxel sizes scaled (choice 0: ×0.85 every axis, 1: ×1.08 every axis, 2: ×0.75
    one axis, 3: ×1.25 one axis), the grid's centre kept."""
    scale = np.ones(3)
    if choice < 2:
        scale[:] = (0.85, 1.08)[choice]
    else:
        scale[int(rng.integers(3))] = (0.75, 1.25)[choice - 2]
    new_affine = _voxel_map(affine, np.diag([*scale, 1.0]), image.shape)
    return Copy(image, labels, new_affine, parameters={"scale": scale.tolist()})


# ------------------------------------------------------------------------------ files
def write_copies(data_dir: str, out: str, subjects, names) -> list:
    """Each subject's copies as ``out/images/<subject>_<degradation>.nii.gz`` and
    ``out/labels/...`` (the same names): [(image path, label path)]."""
    from bench import quality
    from ltnet_tf.io import volumes

    written = []
    for index, subject in enumerate(subjects):
        source = quality.source_of(data_dir, subject)
        image, labels = volumes.load_scan(source[0]), volumes.load_label_map(source[1])
        for name in names:
            made = degrade(name, image.data, labels.data, image.affine, seed_of(subject, name),
                           index)
            paths = [os.path.join(out, kind, f"{subject}_{name}.nii.gz")
                     for kind in ("images", "labels")]
            for path in paths:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            volumes.save_nifti(made.image, made.affine, paths[0], dtype="float32")
            volumes.save_nifti(made.labels, made.affine, paths[1])
            written.append(tuple(paths))
            print(f"{subject} {name}: {made.parameters}", flush=True)
    return written


def main(argv):
    del argv
    from absl import flags
    from bench import quality

    FLAGS = flags.FLAGS
    subjects = FLAGS.subjects or quality.HELD_OUT
    write_copies(FLAGS.data_dir, FLAGS.out, subjects, FLAGS.degradations)


if __name__ == "__main__":
    from absl import app, flags

    from bench import harness

    harness.define_flags("degradations", work=False)
    flags.DEFINE_string("out", None, "Folder for images/ and labels/ of the copies.", required=True)
    flags.DEFINE_list("subjects", None, "Subjects (default: the held-out ones of bench.quality).")
    flags.DEFINE_list("degradations", list(DEGRADATIONS), "Which copies.")
    app.run(main)
