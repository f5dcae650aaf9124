"""The labelled examples a segmenter learns from, and their random variations.

Three kinds of example, all on the working grid (the atlas's brain box pooled by ``downsample``;
``working_example``), each an image with its label *fractions* (the share of each label in a
working voxel, from average-pooling the full-resolution one-hot map, so boundaries keep their
sub-voxel position):

    labelled      a scan with manual labels: the atlas itself (and, with several atlases, the
                  others)
    pseudo        an unlabelled scan with the labels the label transfer (or fusion) gave it
    shape         the atlas image and labels warped together by the registration the product
                  computed from the atlas to an unlabelled scan: a new anatomy whose labels fit
                  its image exactly

A *synthesised* example (Zhao et al., CVPR 2019, "Data augmentation using learned transformations
for one-shot medical image segmentation": spatial transform from one scan, appearance from
another) is a shape example whose intensities are mapped structure by structure onto those of
another pseudo-labelled scan (``appearance_statistics``; DataAug learns this appearance model, here
each structure's mean and spread are matched, which needs no training). Every example drawn for
training (``ExampleSampler``) then gets a random smooth deformation and small affine, a bias field,
a gamma change, a contrast change, sometimes a resolution change (pooled x2 and back), and noise.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ltnet_tf.config import SegmenterConfig
from ltnet_tf.io import volumes as data
from ltnet_tf.registration import transfer

KINDS = ("labelled", "pseudo", "shape")


@dataclass
class Example:
    """One example on the working grid: ``image`` [d, h, w] float32 (normalised intensities),
    ``fractions`` [d, h, w, L] uint8 (label shares x 255, channel = position in label_ids)."""
    name: str
    kind: str
    image: np.ndarray
    fractions: np.ndarray


def crop_to_box(volume: tf.Tensor, config: SegmenterConfig) -> tf.Tensor:
    """[B, D, H, W, C] on the atlas grid -> [B, *crop_shape, C]: the brain box, padded with zeros
    where it reaches past the grid."""
    start, shape = config.crop_start, config.crop_shape
    grid = volume.shape.as_list()[1:4]
    stop = [min(s + n, g) for s, n, g in zip(start, shape, grid)]
    box = volume[:, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2], :]
    pad = [[0, 0]] + [[0, n - (e - s)] for s, n, e in zip(start, shape, stop)] + [[0, 0]]
    return tf.pad(box, pad) if any(p[1] for p in pad[1:4]) else box


def to_working(volume: tf.Tensor, config: SegmenterConfig) -> tf.Tensor:
    """[B, D, H, W, C] on the atlas grid -> [B, *working_shape, C]: cropped, average-pooled."""
    box = crop_to_box(volume, config)
    factor = int(config.downsample)
    return box if factor == 1 else tf.nn.avg_pool3d(box, factor, factor, "VALID")


def working_image(scan_on_grid: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """Raw intensities [D, H, W] on the atlas grid -> normalised working image [d, h, w]."""
    scan = data.normalize_intensity(tf.constant(np.asarray(scan_on_grid, np.float32)[None, ..., None]))
    return to_working(scan, config)[0, ..., 0].numpy()


def crop_labels(labels_on_grid: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """Label IDs [D, H, W] -> the brain box [*crop_shape] (background where it reaches past the
    grid)."""
    box = np.zeros(config.crop_shape, np.asarray(labels_on_grid).dtype)
    start = config.crop_start
    part = np.asarray(labels_on_grid)[tuple(slice(s, s + n) for s, n in
                                            zip(start, config.crop_shape))]
    box[tuple(slice(0, n) for n in part.shape)] = part
    return box


def working_fractions(labels_on_grid: np.ndarray, config: SegmenterConfig) -> np.ndarray:
    """Label IDs [D, H, W] on the atlas grid -> label fractions [d, h, w, L] uint8 (x 255) on the
    working grid: the share of each label among the downsample³ voxels of each working voxel
    (one count over the box, not L one-hot volumes); IDs not in ``config.label_ids`` count as
    background."""
    factor, count = int(config.downsample), len(config.label_ids)
    indices = data.labels_to_indices(crop_labels(labels_on_grid, config), config.label_ids)
    working = config.working_shape
    coarse = [np.arange(n) // factor for n in config.crop_shape]
    cell = ((coarse[0][:, None, None] * working[1] + coarse[1][None, :, None]) * working[2]
            + coarse[2][None, None, :])
    counts = np.bincount((cell * count + indices).ravel(),
                         minlength=int(np.prod(working)) * count)
    shares = counts.reshape(*working, count) * (255.0 / factor ** 3)
    return np.rint(shares).astype(np.uint8)


def working_example(name: str, kind: str, scan_on_grid: np.ndarray, labels_on_grid: np.ndarray,
                    config: SegmenterConfig, normalised: bool = False) -> Example:
    """An ``Example`` from a scan [D, H, W] and its label IDs [D, H, W] on the atlas grid
    (``normalised``: the scan's intensities are already normalised, e.g. a warped atlas)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    image = (to_working(tf.constant(np.asarray(scan_on_grid, np.float32)[None, ..., None]),
                        config)[0, ..., 0].numpy()
             if normalised else working_image(scan_on_grid, config))
    return Example(name, kind, image.astype(np.float32),
                   working_fractions(labels_on_grid, config))


def appearance_statistics(image: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Each label's intensity mean and standard deviation in an example, weighted by its
    fractions -> [L, 2] float32 (NaN for a label absent from it)."""
    weights = fractions.reshape(-1, fractions.shape[-1]).astype(np.float64) / 255.0
    values = image.reshape(-1).astype(np.float64)
    total = weights.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = values @ weights / total
        spread = np.sqrt(np.maximum((values ** 2) @ weights / total - mean ** 2, 0.0))
    found = total > 1.0
    return np.stack([np.where(found, mean, np.nan), np.where(found, spread, np.nan)],
                    -1).astype(np.float32)


def appearance_mapping(source: np.ndarray, target: np.ndarray) -> tuple:
    """(scale [L], shift [L]) float32 mapping intensities label by label from the ``source``
    statistics [L, 2] (an example's own, ``appearance_statistics``) onto the ``target`` ones:
    I -> I * scale + shift = (I - mean_s) * std_t / std_s + mean_t (scale clipped to [0.5, 2]).
    Labels missing from either side, and the background (label 0), keep I -> I."""
    source, target = np.asarray(source, np.float32), np.asarray(target, np.float32)
    usable = np.isfinite(source).all(-1) & np.isfinite(target).all(-1) & (source[:, 1] > 1e-3)
    usable[0] = False
    scale = np.where(usable, np.clip(target[:, 1] / np.where(usable, source[:, 1], 1.0),
                                     0.5, 2.0), 1.0)
    shift = np.where(usable, target[:, 0] - scale * np.nan_to_num(source[:, 0]), 0.0)
    return scale.astype(np.float32), shift.astype(np.float32)


def map_appearance(image: tf.Tensor, fractions: tf.Tensor, scale: tf.Tensor,
                   shift: tf.Tensor) -> tf.Tensor:
    """``image`` [...] with label fractions [..., L] (summing to 1): each label's mapping
    I * scale + shift (``appearance_mapping``), blended by the fractions."""
    return tf.reduce_sum((image[..., None] * scale + shift) * fractions, -1)


# ------------------------------------------------------------------------------- random variations
def _smooth_field(rng: tf.random.Generator, points: int, shape, channels: int,
                  std: float) -> tf.Tensor:
    """A random field [*shape, channels]: N(0, std) on a ``points``³ grid, linearly upsampled."""
    coarse = rng.normal([1, points, points, points, channels]) * std
    field = coarse
    for axis, size in enumerate(shape, start=1):
        field = transfer.resize_axis(field, axis, size / points, size)
    return field[0]


def random_displacement(rng: tf.random.Generator, shape, config: SegmenterConfig) -> tf.Tensor:
    """[*shape, 3] working voxels: a smooth random displacement (std ``deform_voxels`` at
    ``deform_grid``³ control points) plus a small random affine (+-4 % scale, +-0.06 rad
    shear/rotation terms) about the centre."""
    field = _smooth_field(rng, config.deform_grid, shape, 3, config.deform_voxels)
    matrix = rng.uniform([3, 3], -0.04, 0.04)
    grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) - (s - 1) / 2 for s in shape],
                                indexing="ij"), -1)
    return field + tf.einsum("dhwi,ji->dhwj", grid, matrix)


def warp(volume: tf.Tensor, displacement: tf.Tensor) -> tf.Tensor:
    """[d, h, w, C] pulled by ``displacement`` [d, h, w, 3] (trilinear, clipped at the edges)."""
    shape = volume.shape.as_list()[:3]
    grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in shape], indexing="ij"),
                    -1)
    points = tf.clip_by_value(grid + displacement, 0.0,
                              tf.constant([s - 1 for s in shape], tf.float32))
    return transfer.sample_linear(volume, points)


def vary_intensity(rng: tf.random.Generator, image: tf.Tensor,
                   config: SegmenterConfig) -> tf.Tensor:
    """A bias field, gamma, contrast, sometimes a resolution change, noise; the background (0)
    stays 0 and values stay in [0, 1.5]. ``image`` [d, h, w]."""
    brain = tf.cast(image > 0, tf.float32)
    shape = image.shape.as_list()
    bias = tf.exp(_smooth_field(rng, 4, shape, 1, config.bias_strength)[..., 0])
    gamma = tf.exp(rng.normal([]) * config.gamma_std)
    image = tf.pow(tf.clip_by_value(image * bias, 1e-6, 1.5), gamma)
    image = image * rng.uniform([], 0.85, 1.15) + rng.uniform([], -0.05, 0.05)
    if rng.uniform([]) < config.blur_probability and all(s % 2 == 0 for s in shape):
        pooled = tf.nn.avg_pool3d(image[None, ..., None], 2, 2, "VALID")
        image = tf.repeat(tf.repeat(tf.repeat(pooled, 2, 1), 2, 2), 2, 3)[0, ..., 0]
    image = image + rng.normal(shape) * rng.uniform([], 0.0, config.noise_std)
    return tf.clip_by_value(image, 0.0, 1.5) * brain
