"""The intensity model's prior: the label transfer's answer as soft maps over the brain.

One atlas: its labels one-hot. Several: each atlas's label weighted by its fusion weight there (so
the prior is uncertain where the atlases disagree). Each structure's map is smoothed by a Gaussian
in mm (SAMSEG's probabilistic atlas is smooth for the same reason: where a boundary lies is known
to a voxel or two), within its own box, one structure a thread. Label 0 (inside the brain: CSF,
vessels, dura that atlases leave unlabelled) is the complement of the others, since smoothing
keeps a partition of unity.

A voxel whose prior is one label (farther than the smoothing reaches from any other) is
*certain*: its posterior is that label whatever its intensity. The others, *uncertain*, keep their
few largest priors as rows of ``slots``: the EM works on those rows only.
"""
from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage


@dataclass
class TransferPrior:
    """The prior over the brain's voxels inside ``box`` (a tuple of slices of the grid): ``mask``
    [box] the voxels modelled; ``ids`` [L] the label IDs (compact index -> ID); ``own`` [M] the
    transfer's label (compact index) of each modelled voxel, in C order; ``uncertain_voxels`` [U]
    which of the M have a prior over more than one label, and for those ``slot_labels`` [U, K]
    (compact index, -1 none) and ``slot_prior`` [U, K] (sums to 1)."""
    box: tuple
    mask: np.ndarray
    ids: np.ndarray
    own: np.ndarray
    uncertain_voxels: np.ndarray
    slot_labels: np.ndarray
    slot_prior: np.ndarray

    @classmethod
    def build(cls, labels, mask, spacing_mm, *, sigma_mm: float, truncate: float,
              floor: float, slots: int, votes=None) -> Optional["TransferPrior"]:
        """``labels`` [D, H, W] the transfer's label IDs, ``mask`` [D, H, W] bool the voxels to
        model, ``spacing_mm`` (3,); the smoothing's ``sigma_mm`` cut at ``truncate`` sigmas; a
        prior ≤ ``floor`` is none; at most ``slots`` labels per voxel; ``votes`` as
        ``IntensityModel``. None when no structure is labelled."""
        sigma = [sigma_mm / float(s) for s in spacing_mm]
        reach = [int(math.ceil(truncate * s)) for s in sigma]
        box = _box(labels != 0, reach, labels.shape)
        if box is None:
            return None
        box_mask = mask[box]
        maps, weights = _vote_maps(labels, box, votes)
        ids, compact = _compact_labels(maps)
        own = compact[0] if votes is None else _compact_labels([labels[box]], ids)[1][0]
        soft, regions = _smoothed_maps(compact, weights, ids, reach, sigma, truncate)
        count = np.zeros(box_mask.shape, np.uint8)
        for j, values in soft.items():
            count[regions[j]] += values > floor
        uncertain = box_mask & (count > 1)
        width = min(slots, max(int(count[uncertain].max()) if uncertain.any() else 1, 1))
        slot_labels, slot_prior = _slots(soft, regions, uncertain, width, floor)
        import os
        if os.environ.get("MODE_PRESERVING"):
            _keep_the_mode(slot_labels, slot_prior, own[uncertain])
        return cls(box, box_mask, ids, own[box_mask],
                   np.flatnonzero(uncertain[box_mask]), slot_labels, slot_prior)

    def posterior_shares(self, posterior, wanted, shape) -> np.ndarray:
        """[len(wanted), *shape] uint8 (×255): each wanted label's posterior (certain voxels: 1 for
        their label)."""
        shares = np.zeros((len(wanted), *shape), np.uint8)
        for k, label in enumerate(wanted):
            index = np.searchsorted(self.ids, label)
            if index >= len(self.ids) or self.ids[index] != label:
                continue
            inside = (self.own == index).astype(np.float32)
            inside[self.uncertain_voxels] = np.sum(posterior * (self.slot_labels == index), 1)
            plane = shares[k][self.box]
            plane[self.mask] = np.rint(255 * np.clip(inside, 0, 1)).astype(np.uint8)
            shares[k][self.box] = plane
        return shares


def _keep_the_mode(slot_labels, slot_prior, own) -> None:
    """In place: each row's own label (the transfer's) gets at least the largest prior of the
    others, so the prior's mode is the transfer's label (smoothing alone would erode structures
    thinner than the Gaussian)."""
    match = slot_labels == own[:, None].astype(slot_labels.dtype)
    missing = ~match.any(1)
    if missing.any():  # the own label was cut by the slot limit: it takes the weakest slot
        rows = np.flatnonzero(missing)
        weakest = slot_prior[rows].argmin(1)
        slot_labels[rows, weakest] = own[rows]
        slot_prior[rows, weakest] = 0.0
        match = slot_labels == own[:, None].astype(slot_labels.dtype)
    others = np.where(match, -1.0, slot_prior).max(1)
    mine = np.where(match, slot_prior, 0.0).sum(1)
    boosted = np.maximum(mine, others * 1.001)
    slot_prior[match] = boosted[match.any(1)]
    slot_prior /= sum(slot_prior[:, k] for k in range(slot_prior.shape[1]))[:, None]


def _smoothed_maps(compact, weights, ids, reach, sigma, truncate) -> tuple:
    """({label index: its smoothed soft map on its region}, {label index: region slices}); label
    0's map is the complement of the others' over the whole box."""
    regions = _label_boxes(compact, len(ids), reach)
    background = int(np.searchsorted(ids, 0)) if 0 in ids else None
    structures = [j for j in range(len(ids)) if j != background and regions[j] is not None]

    def smoothed(j):
        region = regions[j]
        if weights is None:
            soft = (compact[0][region] == j).astype(np.float32)
        else:
            soft = sum(w[region] * (m[region] == j) for m, w in zip(compact, weights))
        return ndimage.gaussian_filter(soft, sigma, truncate=truncate, mode="constant")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # SciPy's filters release the GIL
        soft = dict(zip(structures, pool.map(smoothed, structures)))
    if background is not None:
        total = np.zeros(compact[0].shape, np.float32)
        for j in structures:
            total[regions[j]] += soft[j]
        soft[background] = np.clip(1.0 - total, 0.0, 1.0)
        regions[background] = tuple(slice(0, n) for n in total.shape)
    return soft, regions


def _slots(soft: dict, regions: dict, uncertain: np.ndarray, width: int, floor: float) -> tuple:
    """(slot_labels [U, width] int16, slot_prior [U, width] float32 normalised) of the
    ``uncertain`` voxels (C order): each voxel's labels whose prior exceeds ``floor``, the
    ``width`` largest when there are more."""
    rows = np.full(uncertain.shape, -1, np.int32)
    rows[uncertain] = np.arange(int(uncertain.sum()), dtype=np.int32)
    slot_labels = np.full((int(uncertain.sum()), width), -1, np.int16)
    slot_prior = np.zeros(slot_labels.shape, np.float32)
    filled = np.zeros(len(slot_labels), np.int32)
    for j in sorted(soft):
        values, where = soft[j], rows[regions[j]]
        keep = where >= 0
        keep &= values > floor
        at, value = where[keep], values[keep]
        slot = filled[at]
        free = slot < width
        if not free.all():  # a full row: its smallest prior gives way if this one is larger
            full, larger_value = at[~free], value[~free]
            weakest = slot_prior[full].argmin(1)
            larger = larger_value > slot_prior[full, weakest]
            slot_labels[full[larger], weakest[larger]] = j
            slot_prior[full[larger], weakest[larger]] = larger_value[larger]
            at, value, slot = at[free], value[free], slot[free]
        flat = at.astype(np.int64) * width + slot
        slot_labels.ravel()[flat] = j
        slot_prior.ravel()[flat] = value
        filled[at] = slot + 1
    slot_prior /= np.maximum(sum(slot_prior[:, k] for k in range(width)), 1e-12)[:, None]
    return slot_labels, slot_prior


def _box(labelled: np.ndarray, reach, shape) -> Optional[tuple]:
    """Slices of the grid around ``labelled`` voxels, ``reach`` voxels wider (None: none)."""
    box = []
    for axis in range(3):
        found = np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(found):
            return None
        box.append(slice(max(int(found[0]) - reach[axis], 0),
                         min(int(found[-1]) + reach[axis] + 1, shape[axis])))
    return tuple(box)


def _vote_maps(labels, box, votes) -> tuple:
    """([label map per atlas] on the box, [normalised weight map per atlas] or None)."""
    if votes is None:
        return [labels[box]], None
    flat_index, candidates, weights = votes
    shape = tuple(s.stop - s.start for s in box)
    position = np.unravel_index(np.asarray(flat_index), labels.shape)
    inside = np.all([(p >= s.start) & (p < s.stop) for p, s in zip(position, box)], axis=0)
    local = np.ravel_multi_index([p[inside] - s.start for p, s in zip(position, box)], shape)
    count = len(candidates)
    maps = []
    for k in range(count):
        atlas = labels[box].copy().ravel()
        atlas[local] = np.asarray(candidates[k])[inside]
        maps.append(atlas.reshape(shape))
    if weights is None:
        return maps, [np.full(shape, 1.0 / count, np.float32)] * count
    clipped = np.maximum(np.asarray(weights, np.float32)[:, inside], 0.0)
    total = clipped.sum(0)
    clipped = np.where(total > 0, clipped / np.where(total > 0, total, 1.0), 1.0 / count)
    weight_maps = []
    for k in range(count):
        w = np.full(int(np.prod(shape)), 1.0 / count, np.float32)
        w[local] = clipped[k]
        weight_maps.append(w.reshape(shape))
    return maps, weight_maps


def _compact_labels(maps, ids: np.ndarray = None) -> tuple:
    """(sorted label IDs found in ``maps`` (or ``ids``), each map as int16 indices into them). A
    look-up table when the IDs are small non-negative integers (label maps are), else a search."""
    low, high = min(int(m.min()) for m in maps), max(int(m.max()) for m in maps)
    if low >= 0 and high < 1 << 20:
        if ids is None:
            present = np.zeros(high + 1, bool)
            for m in maps:
                present[np.bincount(m.ravel(), minlength=high + 1) > 0] = True
            ids = np.flatnonzero(present)
        table = np.zeros(max(high, int(ids[-1])) + 1, np.int16)
        table[ids] = np.arange(len(ids), dtype=np.int16)
        return ids, [table[m] for m in maps]
    if ids is None:
        ids = np.unique(np.concatenate([np.unique(m) for m in maps]))
    return ids, [np.searchsorted(ids, m).astype(np.int16) for m in maps]


def _label_boxes(compact, count: int, reach) -> list:
    """Per label index: slices of the box around it in any atlas's map, ``reach`` wider."""
    boxes = [None] * count
    for found in (ndimage.find_objects(m + np.int16(1), max_label=count) for m in compact):
        for j, slices in enumerate(found):
            if slices is None:
                continue
            if boxes[j] is not None:
                slices = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                               for a, b in zip(slices, boxes[j]))
            boxes[j] = slices
    shape = compact[0].shape
    return [None if b is None else tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                                         for s, r, n in zip(b, reach, shape)) for b in boxes]
