"""The labelled scans a prediction transfers labels from: one atlas (the one-shot setting) or several
(multi-atlas segmentation with label fusion, ``ltnet_tf.registration.fusion``).

The first atlas is the primary one: every scan is aligned to it, and every displacement lives on its
grid. Another atlas may sit on a grid of its own; it is aligned to the primary atlas once (rigid +
affine, ``ltnet_tf.registration.alignment``), its image resampled onto the primary grid for the registration,
while its label map stays on its own grid and is read through the composed map (scan voxel ->
primary grid -> displacement -> its own voxels), so labels are interpolated once, as for one atlas.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from absl import logging

from ltnet_tf.io import volumes as data
from ltnet_tf.io.pairs import pair_images_and_labels
from ltnet_tf.registration import alignment as alignment_lib


@dataclass
class Atlas:
    """One labelled scan, ready to register to scans aligned to the primary atlas."""
    name: str
    image: data.Volume               # on the primary atlas's grid (resampled once if needed)
    labels: data.Volume              # on its own grid
    labels_from_grid: Optional[np.ndarray] = None  # primary voxel -> its label voxel (own grid)
    alignment: Optional[alignment_lib.Alignment] = None  # to the primary atlas, if it had to be

    def record(self) -> dict:
        """For prediction.json."""
        return {"name": self.name, "image": os.path.abspath(self.image.path),
                "labels": os.path.abspath(self.labels.path),
                "aligned_to_primary": None if self.alignment is None
                else self.alignment.to_dict()}


def default_atlas_labels(atlas_path: str):
    """The label map beside an atlas: ``<atlas>_labels.nii.gz`` or ``.mgz``, else
    ``atlas_labels.nii.gz`` in its folder; None if there is none."""
    folder = os.path.dirname(os.path.abspath(atlas_path))
    name = data.scan_name(atlas_path)
    for candidate in (f"{name}_labels.nii.gz", f"{name}_labels.mgz", "atlas_labels.nii.gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(atlas_path):
            return path
    return None


def atlas_files(atlas, atlas_labels=None) -> list:
    """[(image path, label map path)] of the atlases given on the command line: comma-separated
    files paired by order, folders paired by file name, a missing label map looked for beside its
    image (``default_atlas_labels``). Raises DataError naming what is missing."""
    images = data.split_paths(atlas)
    if len(images) == 1 and os.path.isdir(images[0]):
        if not atlas_labels:
            raise data.DataError(f"{images[0]}: a folder of atlases needs --atlas_labels (a "
                                 f"folder of their label maps, matched by file name)")
        return pair_images_and_labels(images[0], atlas_labels)
    labels = data.split_paths(atlas_labels) if atlas_labels else [None] * len(images)
    if len(labels) != len(images):
        raise data.DataError(f"{len(images)} atlas images but {len(labels)} label maps: give one "
                             f"label map per atlas, in the same order")
    pairs = []
    for image, label_map in zip(images, labels):
        if not os.path.exists(image):
            raise data.DataError(f"{image}: file not found")
        label_map = label_map or default_atlas_labels(image)
        if label_map is None:
            raise data.DataError(f"{image}: --atlas_labels not given and no "
                                 f"<atlas>_labels.nii.gz / atlas_labels.nii.gz beside it")
        pairs.append((image, label_map))
    return pairs


def label_ids_of(labels: data.Volume) -> list:
    """Background (0) first, then the foreground IDs in increasing order."""
    return [0, *sorted(int(i) for i in np.unique(labels.data) if i != 0)]


# Atlases of one labelling protocol share most IDs (FreeSurfer asegs differ in a few rare ones,
# e.g. 5th-Ventricle, non-WM-hypointensities); below this overlap (Jaccard) they are of different
# protocols, and fusing them would mix structures.
MIN_SHARED_IDS = 0.5


def _id_list(ids) -> str:
    ids = sorted(ids)
    return f"{ids[:10]}{' ...' if len(ids) > 10 else ''}"


def _check_same_ids(first: Atlas, other: Atlas) -> None:
    """Refuse an atlas of another labelling protocol; warn about IDs only some atlases have."""
    ids, other_ids = set(label_ids_of(first.labels)) - {0}, set(label_ids_of(other.labels)) - {0}
    if ids == other_ids:
        return
    only_first, only_other = ids - other_ids, other_ids - ids
    if len(ids & other_ids) < MIN_SHARED_IDS * len(ids | other_ids):
        raise data.DataError(
            f"{other.labels.path}: label IDs differ from {first.labels.path}'s (only there: "
            f"{_id_list(only_first)}; only here: {_id_list(only_other)}): atlases must label the "
            f"same structures with the same IDs")
    logging.warning("%s: label IDs %s are only in %s, %s only here; those structures are voted "
                    "for by the atlases that have them", other.labels.path, _id_list(only_first),
                    first.labels.path, _id_list(only_other))


def _check_atlases(atlases: list) -> None:
    """Distinct names (they tell the atlases apart in prediction.json), one labelling protocol."""
    seen = {}
    for atlas in atlases:
        if atlas.name in seen:
            raise data.DataError(f"{atlas.image.path}: another atlas is also named "
                                 f"'{atlas.name}' ({seen[atlas.name]}); give each atlas a file "
                                 f"name of its own")
        seen[atlas.name] = atlas.image.path
    for other in atlases[1:]:
        _check_same_ids(atlases[0], other)


class AtlasSet:
    """The atlases of a prediction; ``atlases[0]`` is the primary one."""

    def __init__(self, atlases: list, checked: bool = False):
        """``checked``: ``_check_atlases`` ran already (``load`` checks before aligning; checking
        again would repeat its warnings)."""
        if not atlases:
            raise ValueError("at least one atlas is needed")
        if not checked:
            _check_atlases(atlases)
        self.atlases = list(atlases)

    primary = property(lambda self: self.atlases[0])

    @property
    def label_ids(self) -> list:
        """Background (0) first, then every atlas's foreground IDs in increasing order."""
        ids = set()
        for atlas in self.atlases:
            ids |= set(label_ids_of(atlas.labels))
        return [0, *sorted(ids - {0})]

    def __len__(self):
        return len(self.atlases)

    def images_on_grid(self) -> np.ndarray:
        """[A, D, H, W] atlas images on the primary grid (raw intensities)."""
        return np.stack([np.asarray(a.image.data, np.float32) for a in self.atlases])

    def records(self) -> list:
        return [a.record() for a in self.atlases]

    @classmethod
    def from_volumes(cls, image: data.Volume, labels: data.Volume) -> "AtlasSet":
        """One atlas (a run folder's). Raises DataError when its label map is on another grid."""
        data.check_same_grid(image, labels, strict=True)
        return cls([Atlas(data.scan_name(image.path), image, labels)])

    @classmethod
    def load(cls, image_paths: list, label_paths: list, settings=None) -> "AtlasSet":
        """Atlases from files: ``image_paths[i]`` with ``label_paths[i]`` (each pair on one grid).
        Atlases after the first that are not on its grid are aligned to it (a progress line
        each). Raises DataError naming the file for unreadable files, a label map on another grid
        than its image, mismatched label IDs, a failed alignment."""
        if len(image_paths) != len(label_paths):
            raise data.DataError(f"{len(image_paths)} atlas images but {len(label_paths)} label "
                                 f"maps: give one label map per atlas, in the same order")
        volumes = []
        for image_path, label_path in zip(image_paths, label_paths):
            image, labels = data.load_scan(image_path), data.load_label_map(label_path)
            data.check_same_grid(image, labels, strict=True)
            volumes.append((image, labels))
        atlases = [Atlas(data.scan_name(image.path), image, labels) for image, labels in volumes]
        _check_atlases(atlases)  # before any alignment: a refusal should not wait for it
        primary_image, aligner = atlases[0].image, None
        for index, atlas in enumerate(atlases[1:], start=1):
            if not alignment_lib.on_atlas_grid(primary_image, atlas.image):
                aligner = aligner or alignment_lib.AtlasAligner(
                    primary_image, settings or alignment_lib.AlignmentSettings())
                atlases[index] = _aligned_atlas(aligner, atlas)
        return cls(atlases, checked=True)


def _aligned_atlas(aligner, atlas: Atlas) -> Atlas:
    found = aligner.align(atlas.image, force=True)
    if not found.ok:
        raise data.DataError(f"{atlas.image.path}: alignment to the primary atlas failed (brain "
                             f"overlap {found.brain_overlap:.2f}, intensity correlation "
                             f"{found.correlation:.2f}); check its header orientation")
    logging.info("atlas %s aligned to the primary atlas in %.1f s (brain overlap %.2f)",
                 atlas.name, found.seconds, found.brain_overlap)
    return Atlas(atlas.name, found.resample_scan(atlas.image), atlas.labels,
                 labels_from_grid=found.atlas_voxel_to_scan_voxel, alignment=found)
