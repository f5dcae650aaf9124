"""The evidence a label transfer leaves about its own success, measured per scan and per structure.

A learned segmenter gives labels and nothing else; a label transfer also leaves how well the
registered atlas matches the scan, how much it had to deform, how far the scan's own intensities
disagree with where the atlas put the boundaries, and with several atlases how much they agree
(reverse classification accuracy, Valindria et al., IEEE TMI 2017, and the atlas-agreement
measures of multi-atlas segmentation, e.g. Heckemann et al., NeuroImage 2006, use the same
evidence). ``measure`` collects it from what ``Predictor.segment`` has at hand, without a second
registration; ``quality.QualityModel`` turns it into an expected Dice.

Where each figure is measured:
    the refinement's fine grid (``quality_evidence.FineGrid``: the atlases' labels there, fused
        by majority)
        local NCC (window 5) of the scan and each warped atlas, the atlases' agreement, the
        displacement's Jacobian, the scan's intensities per structure (normalised as the
        refinement sees them) and its edges on the structures' boundaries
    the scan's own grid
        the transfer's labels before and after the intensity model (how much of each structure the
        scan's intensities relabelled), the structures' volumes
    the alignment
        brain overlap, intensity correlation, the affine's scale, anisotropy and rotation

``measure`` returns {'scan': {name: value}, 'structures': {label ID: {name: value}}}: plain floats,
rounded, so the record (and the expected Dice made from it) is the same bits on every run.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ltnet_tf.prediction.quality_evidence import AtlasFacts, FineGrid, TransferEvidence

NCC_WINDOW = 5  # voxels of the fine grid (10 mm at half resolution): local, yet a few edges
EPS = 1e-6


def measure(evidence: TransferEvidence, facts: AtlasFacts) -> dict:
    """The signals of one scan (see the module docstring for where each is measured)."""
    fine = FineGrid(evidence, facts)
    log_det = [_log_jacobian(flow / float(facts.factor)) for flow in fine.flows]
    folded = np.mean([~np.isfinite(j) for j in log_det], axis=0)
    log_det = np.mean([np.where(np.isfinite(j), j, 0.0) for j in log_det], axis=0)
    gradient = _gradient_magnitude(fine.scan)
    counts = _label_counts(evidence.labels, fine.index, fine.count)
    columns = {**_registration_signals(fine, log_det, folded),
               **_intensity_signals(fine, gradient),
               **_size_signals(fine, facts, evidence, counts),
               "relabelled": _changed(evidence.transferred, evidence.labels, counts, fine.index,
                                      fine.count)}
    structures = {int(label): {name: float(values[k]) for name, values in columns.items()}
                  for k, label in enumerate(fine.ids)}
    scan = _scan_signals(evidence, fine, log_det, folded, gradient)
    return {"scan": _rounded(scan), "structures": {label: _rounded(values)
                                                   for label, values in structures.items()}}


def _registration_signals(fine: FineGrid, log_det, folded) -> dict:
    """Per structure: the share of it outside the scan's brain (cut off by the field of view),
    its warped atlases' local NCC with the scan, the atlases' agreement on it, its Jacobian's
    spread and folded share."""
    return {"outside": _region_means(~fine.brain, fine.region, fine.count),
            "ncc": np.mean([fine.means(_local_ncc(fine.scan, w, fine.brain))
                            for w in fine.warped], axis=0),
            "agreement": _agreement(fine.atlas_labels, fine.fused, fine.index, fine.count),
            "log_jacobian_sd": fine.spreads(log_det), "folded": fine.means(folded)}


def _intensity_signals(fine: FineGrid, gradient: np.ndarray) -> dict:
    """Per structure: the spread of its intensities, how far they lie from its neighbours'
    (``_separation``), and how strong the scan's edges are on its boundary relative to the
    brain's average (a boundary on an edge is where the scan puts it)."""
    means, sds = fine.means(fine.scan), fine.spreads(fine.scan)
    boundary = _boundary(fine.region, fine.brain)
    brain_edge = float(gradient[fine.brain].mean()) if fine.brain.any() else 1.0
    edge = _region_means(gradient, fine.region * boundary, fine.count) / max(brain_edge, EPS)
    return {"intensity_sd": sds, "separation": _separation(fine.region, fine.brain, fine.scan,
                                                           means, sds),
            "edge": edge}


def _label_counts(labels: np.ndarray, index: np.ndarray, count: int) -> np.ndarray:
    """[count + 1] voxels of each structure number in a label map (its IDs counted first: label
    maps hold few, small IDs)."""
    per_id = np.bincount(np.clip(labels.ravel(), 0, None))
    per_id = per_id[:len(index)]
    return np.bincount(index[:len(per_id)], weights=per_id,
                       minlength=count + 1).astype(np.int64)


def _size_signals(fine: FineGrid, facts: AtlasFacts, evidence: TransferEvidence,
                  counts: np.ndarray) -> dict:
    """Per structure: its atlas volume (log mm³), its atlas share of boundary voxels, and its
    segmented volume (``counts`` [L + 1] voxels) over the atlas's scaled by the alignment (log).
    Voxels outside the brain carry no label."""
    counts = counts[1:]
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(evidence.scan_affine, float)[:3, :3])))
    scale = math.exp(3 * _affine_figures(evidence.alignment)["log_scale"])
    atlas = np.array([facts.volume_mm3.get(int(label), 0.0) for label in fine.ids])
    return {"log_atlas_volume": np.log(np.maximum(atlas, 1.0)),
            "boundary_share": np.array([facts.boundary_share.get(int(label), 1.0)
                                        for label in fine.ids]),
            "log_volume_ratio": np.log(np.maximum(counts * voxel_mm3, 1.0)
                                       / np.maximum(atlas * scale, 1.0))}


def _scan_signals(evidence: TransferEvidence, fine: FineGrid, log_det, folded,
                  gradient) -> dict:
    brain, fused, refined = fine.brain, fine.fused, evidence.refined
    labelled = fused > 0
    return {**_affine_figures(evidence.alignment), **_alignment_figures(evidence.alignment),
            "loss": float(np.mean(refined["loss"])),
            "loss_start": float(np.mean(refined["loss_start"])),
            "atlases": float(len(fine.warped)),
            "remapped": float(evidence.similarity == "remap"),
            "fine_correlation": _correlation(fine.scan, fine.warped[0],
                                             brain | (fine.warped[0] > 0)),
            "outside": float(np.mean(~brain[labelled])) if labelled.any() else 1.0,
            "uncovered": float(np.mean(fused[brain] == 0)) if brain.any() else 1.0,
            "folded": float(np.mean(folded[brain])) if brain.any() else 0.0,
            "log_jacobian_sd": float(np.std(log_det[brain])) if brain.any() else 0.0,
            "noise": _noise(fine.scan, brain, gradient),
            **_voxel_figures(evidence.scan_affine), **_model_figures(evidence.intensity_model)}


# ------------------------------------------------------------------------------ per structure
def _region_means(values: np.ndarray, region: np.ndarray, count: int) -> np.ndarray:
    """[count] mean of ``values`` over each region 1..count of ``region`` (0: not counted; an
    empty region's mean is 0)."""
    flat = region.ravel()
    sums = np.bincount(flat, weights=np.asarray(values, np.float64).ravel(), minlength=count + 1)
    sizes = np.bincount(flat, minlength=count + 1)
    return (sums / np.maximum(sizes, 1))[1:]


def _agreement(atlas_labels: np.ndarray, fused: np.ndarray, index: np.ndarray,
               count: int) -> np.ndarray:
    """[count] mean over the atlases of the Dice of each atlas's structure with the fused one
    (1 for a single atlas)."""
    if len(atlas_labels) == 1:
        return np.ones(count)
    fused_index = index[fused].ravel()
    fused_sizes = np.bincount(fused_index, minlength=count + 1)
    scores = []
    for labels in atlas_labels:
        own = index[labels].ravel()
        sizes = np.bincount(own, minlength=count + 1)
        both = np.bincount(own[own == fused_index], minlength=count + 1)
        scores.append(2.0 * both / np.maximum(sizes + fused_sizes, 1))
    return np.mean(scores, axis=0)[1:]


def _local_ncc(scan: np.ndarray, warped: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Squared local correlation (as the refinement's loss, in a window of ``NCC_WINDOW``) of the
    scan and a warped atlas; 0 outside the brain. Computed on the brain's box widened by the
    window (the same numbers as on the whole grid, with zeros beyond it)."""
    found = np.zeros(scan.shape, np.float32)
    if not brain.any():
        return found
    reach = NCC_WINDOW // 2
    box = tuple(slice(max(int(i.min()) - reach, 0), int(i.max()) + reach + 1)
                for i in np.nonzero(brain))

    def mean(values):
        return ndimage.uniform_filter(values, NCC_WINDOW, mode="constant")

    s, w = scan[box].astype(np.float32), warped[box].astype(np.float32)
    ms, mw = mean(s), mean(w)
    cross = mean(s * w) - ms * mw
    vs, vw = np.maximum(mean(s * s) - ms * ms, 0.0), np.maximum(mean(w * w) - mw * mw, 0.0)
    found[box] = np.where(brain[box], cross * cross / (vs * vw + EPS), 0.0)
    return found


def _log_jacobian(flow: np.ndarray) -> np.ndarray:
    """log det of the Jacobian of x -> x + ``flow`` [*grid, 3] (in the grid's voxels), −inf where
    it folds; the 3 × 3 determinant written out (float32: a tenth of ``numpy.linalg.det``'s
    time)."""
    d = [list(np.gradient(flow[..., c])) for c in range(3)]  # d[c][a]: d u_c / d x_a
    for c in range(3):
        d[c][c] += 1.0
    det = (d[0][0] * (d[1][1] * d[2][2] - d[1][2] * d[2][1])
           - d[0][1] * (d[1][0] * d[2][2] - d[1][2] * d[2][0])
           + d[0][2] * (d[1][0] * d[2][1] - d[1][1] * d[2][0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(det > 0, np.log(np.maximum(det, EPS)), -np.inf).astype(np.float32)


def _boundary(region: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """[*grid] bool: brain voxels with a 6-neighbour of another structure number."""
    found = np.zeros(region.shape, bool)
    for axis in range(3):
        differs = np.diff(region, axis=axis) != 0
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        found[tuple(low)] |= differs
        found[tuple(high)] |= differs
    return found & brain


def _gradient_magnitude(values: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(g * g for g in np.gradient(values.astype(np.float32))))


def _noise(scan: np.ndarray, brain: np.ndarray, gradient: np.ndarray) -> float:
    """The scan's noise relative to its contrast: the 12.5th percentile of the gradient magnitude
    inside the brain (the middle of its flattest quarter: where tissue is uniform, what varies
    is noise) over the brain's median intensity."""
    if not brain.any():
        return 0.0
    inner = ndimage.binary_erosion(brain, iterations=2)
    values = gradient[inner] if inner.any() else gradient[brain]
    k = len(values) // 8
    return float(np.partition(values, k)[k] / max(float(np.median(scan[brain])), EPS))


def _separation(region: np.ndarray, brain: np.ndarray, scan: np.ndarray, means,
                sds) -> np.ndarray:
    """[count] per structure: how far its intensities lie from its neighbours', |Δμ| / √(σ² + σ²)
    averaged over the faces it shares with each neighbour inside the brain (region 0 inside the
    brain: the unlabelled CSF and vessels)."""
    count = len(means)
    if not brain.any():
        return np.zeros(count)
    mu, sigma = np.r_[0.0, means], np.r_[0.0, sds]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
    region, brain, scan = region[box], brain[box], scan[box]  # contacts inside the brain only
    inside_region = np.where(brain, region, -1)
    background = brain & (region == 0)
    if background.any():
        mu[0], sigma[0] = float(np.mean(scan[background])), float(np.std(scan[background]))
    pairs = np.zeros((count + 1) ** 2)
    for axis in range(3):
        a = np.moveaxis(inside_region, axis, 0)
        first, second = a[:-1].ravel(), a[1:].ravel()
        keep = (first >= 0) & (second >= 0) & (first != second)
        pairs += np.bincount(first[keep] * (count + 1) + second[keep],
                             minlength=(count + 1) ** 2)
    contacts = pairs.reshape(count + 1, count + 1)
    contacts = contacts + contacts.T
    distance = np.abs(mu[:, None] - mu[None]) / np.sqrt(sigma[:, None] ** 2 + sigma[None] ** 2
                                                        + EPS)
    weight = contacts.sum(1)
    return ((contacts * distance).sum(1) / np.maximum(weight, 1))[1:]


def _changed(before: np.ndarray, after: np.ndarray, after_counts: np.ndarray,
             index: np.ndarray, count: int) -> np.ndarray:
    """[count] per structure 1 − Dice of its voxels before and after the intensity model (0 when
    the model changed nothing or was off); ``after_counts`` [count + 1] its voxels after. Only
    the voxels that changed are read twice."""
    if before is after:
        return np.zeros(count)
    changed = np.flatnonzero(before.ravel() != after.ravel())
    top = len(index) - 1
    removed = np.bincount(index[np.clip(before.ravel()[changed], 0, top)], minlength=count + 1)
    added = np.bincount(index[np.clip(after.ravel()[changed], 0, top)], minlength=count + 1)
    before_counts = after_counts - added + removed
    return ((removed + added) / np.maximum(before_counts + after_counts, 1))[1:]


# ------------------------------------------------------------------------------ per scan
def _affine_figures(alignment) -> dict:
    """The affine's mean log scale per axis (0: the atlas's size), anisotropy (log of the
    largest over the smallest scale) and rotation (degrees) from its polar decomposition."""
    linear = np.asarray(alignment.atlas_to_scan_world, float)[:3, :3]
    u, singular, vt = np.linalg.svd(linear)
    rotation = u @ vt
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rotation) - 1.0) / 2.0))))
    return {"log_scale": float(np.mean(np.log(np.maximum(singular, EPS)))),
            "anisotropy": float(np.log(max(singular.max(), EPS) / max(singular.min(), EPS))),
            "rotation_deg": angle, "reflected": float(np.linalg.det(linear) < 0)}


def _alignment_figures(alignment) -> dict:
    if alignment.skipped:
        return {"aligned": 0.0, "brain_overlap": 1.0, "correlation": 1.0, "alignment_ok": 1.0}
    return {"aligned": 1.0, "brain_overlap": float(alignment.brain_overlap),
            "correlation": float(alignment.correlation or 0.0),
            "alignment_ok": float(alignment.ok)}


def _voxel_figures(affine) -> dict:
    sizes = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return {"log_voxel_max": float(np.log(sizes.max())),
            "log_voxel_ratio": float(np.log(sizes.max() / sizes.min()))}


def _model_figures(record) -> dict:
    if not record:
        return {"model_applied": 0.0, "model_changed": 0.0, "model_uncertain": 0.0}
    return {"model_applied": float(bool(record.get("applied"))),
            "model_changed": float(record.get("changed_fraction") or 0.0),
            "model_uncertain": float(record.get("uncertain_fraction") or 0.0)}


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _rounded(values: dict) -> dict:
    return {k: round(float(v), 6) if math.isfinite(float(v)) else 0.0 for k, v in values.items()}
