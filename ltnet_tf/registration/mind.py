"""MIND-SSC: a refinement similarity for scans of another contrast than the atlas's, computed
once per image (``RefinementSettings(similarity="mind")``, ``--similarity mind``).

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarities", MICCAI 2013 (the self-similarity context, SSC), after "MIND: Modality
independent neighbourhood descriptor for multi-modal deformable registration", MedIA 2012. A voxel
is described by how alike the patches around it are to each other, not by its intensity: for the 12
pairs of its six face neighbours (``dilation`` voxels out) that are sqrt(2)·dilation apart, the
patch distance D_p = box mean over a (2 ``radius`` + 1)³ patch of (I(x + a_p) - I(x + b_p))²; then

    MIND_p(x) = exp(-(D_p - min_q D_q) / V(x)),   V(x) = mean_q (D_q - min_q D_q),
                                                  clipped to [1e-3, 1e3] x its mean over the volume.

The same tissue boundary gives the same descriptor whatever the sign or size of its intensity step:
a T1 atlas against T2-, FLAIR- or PD-weighted scans.

How it is used, as ConvexAdam (Siebert, Hansen & Heinrich, "Fast 3D registration with accurate
optimisation and little learning for Learn2Reg 2021") uses it: the descriptors of the scan and of
the atlas are computed **once**, on the full grid, then average-pooled onto each grid the refinement
works on (``DescriptorGrids``); each Adam step pulls the atlas's precomputed descriptors through the
current displacement (``FeatureSampler``, trilinear, 12 channels) and compares them with the scan's
by their squared difference summed over the channels (``descriptor_distance``). Nothing about the
descriptors is recomputed, or differentiated, inside the loop: an earlier version that recomputed
the warped atlas's descriptors in every step did not finish a half-grid scan in 6 minutes.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import itertools
import math

import numpy as np
import tensorflow as tf

from ltnet_tf.io import volumes as data
from ltnet_tf.registration.refinement_terms import to_grid

CHANNELS = 12
# The data term is summed within this many atlas-grid voxels of the atlas's brain (``brain_points``):
# an aligned scan's brain lies within a few voxels of it.
MARGIN = 8
# The six face neighbours, and the 12 pairs of them that are sqrt(2) apart (not opposite).
SIX = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
PAIRS = tuple((a, b) for a, b in itertools.combinations(SIX, 2)
              if sum((p - q) ** 2 for p, q in zip(a, b)) == 2)
assert len(PAIRS) == CHANNELS


def mind_ssc(volume: tf.Tensor, radius: int = 1, dilation: int = 2) -> tf.Tensor:
    """[B, D, H, W] -> [B, D, H, W, 12] MIND-SSC descriptors in (0, 1] (see the module docstring).
    The volume's edges are mirrored for neighbours outside it; the patch mean near an edge is
    over the voxels inside. ``radius`` 1 and ``dilation`` 2 are ConvexAdam's defaults."""
    volume = tf.convert_to_tensor(volume, tf.float32)
    d = int(dilation)
    shape = volume.shape.as_list()[1:4]
    padded = tf.pad(volume, [[0, 0], [d, d], [d, d], [d, d]], "SYMMETRIC")

    def shifted(offset):
        start = [d + o * d for o in offset]
        return padded[:, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1],
                      start[2]:start[2] + shape[2]]

    squared = tf.stack([tf.square(shifted(a) - shifted(b)) for a, b in PAIRS], -1)
    distance = box_mean(squared, int(radius))
    distance = distance - tf.reduce_min(distance, -1, keepdims=True)
    variance = tf.reduce_mean(distance, -1, keepdims=True)
    level = tf.reduce_mean(variance, axis=[1, 2, 3, 4], keepdims=True)
    variance = tf.clip_by_value(variance, level * 1e-3 + 1e-12, level * 1e3 + 1e-12)
    return tf.exp(-distance / variance)


def box_mean(volume: tf.Tensor, radius: int) -> tf.Tensor:
    """[B, D, H, W, C] -> the mean over the (2 ``radius`` + 1)³ box around each voxel, edges
    mirrored: sums of shifted slices along one axis at a time (TensorFlow's CPU avg_pool3d with
    stride 1 took 6x longer)."""
    if radius <= 0:
        return volume
    size = 2 * radius + 1
    for axis in (1, 2, 3):
        paddings = [[0, 0]] * 5
        paddings[axis] = [radius, radius]
        padded = tf.pad(volume, paddings, "SYMMETRIC")
        length = volume.shape[axis]
        volume = tf.add_n([tf.gather(padded, tf.range(k, k + length), axis=axis)
                           if False else _slice(padded, axis, k, length) for k in range(size)])
    return volume / float(size ** 3)


def _slice(volume: tf.Tensor, axis: int, start: int, length: int) -> tf.Tensor:
    begin = [0] * 5
    size = [-1] * 5
    begin[axis], size[axis] = start, length
    return tf.slice(volume, begin, size)


def pool_to_grid(features: tf.Tensor, factor: int) -> tf.Tensor:
    """[B, D, H, W, C] on the atlas grid -> [B, ⌈D/f⌉, ⌈H/f⌉, ⌈W/f⌉, C]: zero padding to a
    multiple of ``factor``, then average pooling (``refinement_terms.to_grid``'s grid, C channels)."""
    shape = features.shape[1:4].as_list()
    padded = data.pad_to_shape(features, [int(math.ceil(s / factor)) * factor for s in shape])
    if factor == 1:
        return padded
    return tf.nn.avg_pool3d(padded, ksize=factor, strides=factor, padding="VALID")


class DescriptorGrids:
    """MIND-SSC of normalised images [B, D, H, W] on the atlas grid, pooled onto grid factors
    ``factors``: ``__call__(images) -> {factor: [B, *grid, 12]}``. The descriptors are made once per
    call (one tf.function, traced once per shape) on the image average-pooled to ``image_factor``
    (default: 2, or 1 for a full-grid stage; at 2, half resolution, with ``dilation`` 1: ConvexAdam's full-grid radius 1, dilation 2, at an
    eighth of the cost: 0.3 s against 3-8 s for a 160x192x224 image on 2 CPU cores, the same
    Dice in bench/results/contrasts.md), then average-pooled to every grid. ``calls`` counts
    the images described (the atlas once per process, each scan once).
    """

    def __init__(self, factors, image_factor: int = None, radius: int = 1, dilation: int = 1):
        self.factors = tuple(sorted(set(int(f) for f in factors)))
        self.image_factor = int(image_factor or min(2, *self.factors))
        if any(f % self.image_factor for f in self.factors):
            raise ValueError(f"grid factors {self.factors} must be multiples of {image_factor}")
        self.radius, self.dilation = int(radius), int(dilation)
        self.calls = 0
        self._describe = tf.function(self._describe_eager, autograph=False)

    def _describe_eager(self, images):
        features = mind_ssc(to_grid(images[..., None], self.image_factor), self.radius,
                            self.dilation)
        return {f: pool_to_grid(features, f // self.image_factor) for f in self.factors}

    def __call__(self, images) -> dict:
        images = tf.convert_to_tensor(images, tf.float32)
        self.calls += int(images.shape[0])
        pooled = [self._describe(images[i:i + 1]) for i in range(int(images.shape[0]))]
        return {f: tf.concat([p[f] for p in pooled], 0) for f in self.factors}


class FeatureSampler:
    """Trilinear pull-warping of fixed feature maps [A, D, H, W, C] (A atlases) at some of the
    grid's voxels (``points``, flat indices [M]; None: all), as ``refinement_terms.AtlasSampler`` does
    for intensities, with a plain gather of the 8 corners (an 8-corner table per voxel would hold
    96 numbers per voxel: 330 MB per atlas at half resolution). Points are clipped to the volume; a
    flow batch of B is pulled through atlas b when A == B, through the one atlas when A == 1.
    """

    def __init__(self, features, points=None):
        features = tf.convert_to_tensor(features, tf.float32)
        self.count = int(features.shape[0])
        self.shape = tuple(features.shape.as_list()[1:4])
        self.channels = int(features.shape[-1])
        self.table = tf.reshape(features, [self.count, -1, self.channels])
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in self.shape],
                                    indexing="ij"), -1).reshape(-1, 3)
        self.points = None if points is None else tf.constant(np.asarray(points, np.int32))
        self.grid = tf.constant(grid if points is None else grid[np.asarray(points)])
        self.last = tf.constant([s - 1 for s in self.shape], tf.float32)

    def __call__(self, flow: tf.Tensor) -> tf.Tensor:
        """flow [B, D, H, W, 3] (voxels) -> features pulled by it at the points, [B, M, C]."""
        flow = tf.reshape(flow, [tf.shape(flow)[0], -1, 3])
        if self.points is not None:
            flow = tf.gather(flow, self.points, axis=1)
        points = tf.clip_by_value(self.grid[None] + flow, 0.0, self.last)
        lower = tf.floor(points)
        fraction = points - lower
        lower = tf.cast(lower, tf.int32)
        upper = tf.minimum(lower + 1, tf.cast(self.last, tf.int32))
        _, height, width = self.shape
        fz, fy, fx = (fraction[..., i:i + 1] for i in range(3))
        rows = [(z * height + y) * width for z in (lower[..., 0], upper[..., 0])
                for y in (lower[..., 1], upper[..., 1])]
        columns = (lower[..., 2], upper[..., 2])

        def corners(row):  # the two corners along x of one (z, y) row of the cell
            if self.count == 1:
                return [tf.gather(self.table[0], row + x) for x in columns]
            return [tf.gather(self.table, row + x, batch_dims=1) for x in columns]

        along_x = [low + fx * (high - low) for low, high in map(corners, rows)]
        along_y = [along_x[i] + fy * (along_x[i + 1] - along_x[i]) for i in (0, 2)]
        return along_y[0] + fz * (along_y[1] - along_y[0])

    def at_points(self, features: tf.Tensor) -> tf.Tensor:
        """[B, D, H, W, C] on this grid -> [B, M, C] at the points."""
        flat = tf.reshape(features, [tf.shape(features)[0], -1, self.channels])
        return flat if self.points is None else tf.gather(flat, self.points, axis=1)


def margin_voxels(factor: int) -> int:
    """``MARGIN`` (in atlas-grid voxels) on a grid ``factor`` times coarser, rounded up."""
    return int(math.ceil(MARGIN / factor))


def brain_points(atlases_on_grid: np.ndarray, margin: int) -> np.ndarray:
    """Flat indices [M] of the voxels of a grid within ``margin`` voxels (a box) of any atlas's
    brain (non-zero voxels; atlases [A, D, H, W] on that grid). Beyond them, an aligned scan and
    the atlas are both background, whose descriptors are equal (all 1): the data term there is 0,
    and leaving those voxels out of the sums makes a step cheaper without changing it."""
    from scipy import ndimage

    brain = np.any(np.asarray(atlases_on_grid) > 0, axis=0)
    grown = ndimage.binary_dilation(brain, np.ones((3, 3, 3), bool), iterations=int(margin))
    return np.flatnonzero(grown).astype(np.int32)


def descriptor_distance(scan_features: tf.Tensor, moved_features: tf.Tensor,
                        voxels: int) -> tf.Tensor:
    """[B, M, C] twice (at M of a grid's ``voxels``) -> [B]: the squared difference summed over
    the channels, averaged over the grid's voxels (ConvexAdam's data term; 0 at the voxels left
    out)."""
    difference = tf.reduce_sum(tf.square(moved_features - scan_features), -1)
    return tf.reduce_sum(difference, axis=-1) / float(voxels)
