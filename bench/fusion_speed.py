"""Speed and memory of ``ltnet_tf.registration.fusion`` at realistic sizes, and its joint label fusion against
the exact (per-patch) formulation: the ``speed`` part of ``python -m bench.fusion``.

Atlases sub-01..05 and the scan sub-06 of ../shared/data are already affinely aligned on one
160×192×224 grid (no deformable registration here: the atlases are only roughly aligned, which is
where fusion rules differ most). Weights are computed on the refinement grid (80×96×112, 2×2×2
average pooling), read at the full grid's voxels and fused there; Dice of the 28 benchmark
structures against labels/sub-06.

Measured (``time.perf_counter``, median and minimum of ``repeats`` calls after one untimed call):
- weight maps for K = 5 (and 10: the five atlases twice) on 80×96×112: locally weighted voting,
  joint label fusion on the whole grid and within the scan's non-zero voxels, and for K = 5 the
  joint errors alone (before the power, the solve and the vote), with the module's window sums
  and with per-patch standardisation (the exact formulation, XLA-compiled, 125 shifted products
  per voxel);
- ``fuse_labels`` on 3M points (K = 5: the atlases' labels at the first 3M voxels of the box
  around their labels; and the worst case, random labels everywhere in dispute),
  ``fuse_at_points`` with joint label fusion maps on the same points, ``label_probability`` of
  one structure;
- peak memory of numpy arrays (``tracemalloc``; TensorFlow's own buffers are not counted).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import os
import time
import tracemalloc

import numpy as np
import tensorflow as tf

from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.registration import fusion


def timed(function, repeats):
    """-> (seconds of ``repeats`` calls after one untimed call, numpy peak MB of one more call,
    result)."""
    result = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return np.array(times), peak, result


def summary(seconds, peak):
    return {"median_seconds": round(float(np.median(seconds)), 3),
            "min_seconds": round(float(seconds.min()), 3), "numpy_peak_mb": round(peak)}


_PER_PATCH_SUMS = {}  # one compiled function per (atlases, grid), so timings exclude compilation


def per_patch_errors(scan, atlases, radius=2, min_std=0.01):
    """Joint errors with every patch standardised by its own statistics (Wang et al., ANTs): the
    pairwise sums over 125 shifted copies, XLA-compiled -> [K, K, D, H, W] before the power."""
    size, shape, count = 2 * radius + 1, scan.shape, len(atlases)
    volumes = np.concatenate([scan[None], atlases]).astype(np.float64)
    inside = fusion._inside_count(shape, size)
    sums = fusion._window_sums(np.concatenate([volumes, volumes ** 2]), size)
    mean, mean_square = sums[:count + 1] / inside, sums[count + 1:] / inside
    std = np.sqrt(np.maximum((mean_square - mean ** 2) * inside / (inside - 1),
                             (min_std * np.ptp(scan)) ** 2))
    # Voxels outside the grid are NaN, left out of the sums as ANTs leaves them out.
    padded = np.pad(volumes, [(0, 0)] + [(radius, radius)] * 3, constant_values=np.nan)
    pairs = [(i, j) for i in range(count) for j in range(i + 1)]
    offsets = np.array(list(np.ndindex(size, size, size)), np.int32)

    def sums(padded, mean, std, offsets):
        def body(k, *accumulators):
            shifted = tf.slice(padded, tf.concat([[0], offsets[k]], 0), [count + 1, *shape])
            standardised = (shifted - mean) / std
            errors = [tf.where(tf.math.is_finite(standardised[i + 1]),
                               tf.abs(standardised[i + 1] - standardised[0]), 0.0)
                      for i in range(count)]
            return (k + 1,) + tuple(a + errors[i] * errors[j]
                                    for a, (i, j) in zip(accumulators, pairs))
        out = tf.while_loop(lambda k, *a: k < len(offsets), body,
                            (tf.constant(0),) + tuple(tf.zeros(shape) for _ in pairs))
        return tf.stack(out[1:])

    compiled = _PER_PATCH_SUMS.setdefault((count, shape), tf.function(sums, jit_compile=True))
    args = [tf.constant(a, tf.float32) for a in (padded, mean, std)] + [tf.constant(offsets)]
    pair_sums = compiled(*args).numpy() / (inside - 1)
    errors = np.empty((count, count, *shape), np.float32)
    for (i, j), pair_sum in zip(pairs, pair_sums):
        errors[i, j] = errors[j, i] = pair_sum
    return errors


def load(data_dir, subjects):
    """-> (full-grid images [S, 160, 192, 224] in [0, 1], label maps, 2 mm images
    [S, 80, 96, 112])."""
    images = np.stack([data.load_scan(os.path.join(data_dir, "images", f"{s}.nii.gz")).data
                       for s in subjects]).astype(np.float32)
    labels = np.stack([data.load_label_map(os.path.join(data_dir, "labels", f"{s}.nii.gz")).data
                       for s in subjects]).astype(np.int32)
    images = (images - images.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(
        images, axis=(1, 2, 3), keepdims=True)
    depth, height, width = images.shape[1:]
    coarse = images.reshape(len(subjects), depth // 2, 2, height // 2, 2, width // 2, 2)
    return images, labels, coarse.mean(axis=(2, 4, 6))


def weights_from_errors(errors, mask, alpha=0.1, beta=2.0):
    """The module's solve and vote over patches, on joint errors computed elsewhere."""
    atlases = errors.shape[0]
    weights = np.full((atlases, *mask.shape), 1.0 / atlases, np.float32)
    matrices = errors[:, :, mask] ** beta
    weights[:, mask] = fusion._solve_weights(matrices, alpha, clip_negative=True)
    return fusion._mean_over_patches(weights, mask, 5)


def weight_timings(scan, atlases, mask, repeats):
    rows = {}
    for count in (5, 10):
        stack = np.concatenate([atlases] * (count // len(atlases)))[:count]
        for name, function in [
                ("locally_weighted_voting", lambda: fusion.locally_weighted_voting_weights(
                    scan, stack)),
                ("joint_label_fusion", lambda: fusion.joint_label_fusion_weights(scan, stack)),
                ("joint_label_fusion_in_mask", lambda: fusion.joint_label_fusion_weights(
                    scan, stack, mask=mask)),
                ("joint_errors_window_sums", lambda: fusion._pairwise_errors(
                    scan, stack, 5, 0.01 * np.ptp(scan))),
                ("joint_errors_per_patch_standardisation", lambda: per_patch_errors(
                    scan, stack))][:3 if count > 5 else 5]:
            seconds, peak, _ = timed(function, repeats)
            rows[f"{name}_K{count}"] = summary(seconds, peak)
            print(f"K={count} {name}: {rows[f'{name}_K{count}']}", flush=True)
    return rows


def vote_timings(labels, points_count, jlf_maps, repeats):
    rows = {}
    # The first points of the labelled region's bounding box (what native.py pulls labels for).
    box = np.argwhere(np.any(labels != 0, axis=0))
    in_box = np.zeros(labels.shape[1:], bool)
    in_box[tuple(slice(low, high + 1) for low, high in zip(box.min(0), box.max(0)))] = True
    brain = np.flatnonzero(in_box.ravel())[:points_count]
    candidates = labels.reshape(len(labels), -1)[:, brain]
    disputed = float(np.mean(np.any(candidates != candidates[0], axis=0)))
    rng = np.random.default_rng(0)
    random_candidates = rng.integers(0, 40, size=candidates.shape).astype(np.int32)
    weights = rng.random(candidates.shape).astype(np.float32)
    full_grid = np.stack(np.unravel_index(brain, labels.shape[1:]), -1)
    points = ((full_grid + 0.5) / 2 - 0.5).astype(np.float32)  # on the 2 mm grid
    for name, function in [
            ("fuse_labels_majority", lambda: fusion.fuse_labels(candidates)),
            ("fuse_labels_weighted", lambda: fusion.fuse_labels(candidates, weights)),
            ("fuse_labels_weighted_all_disputed", lambda: fusion.fuse_labels(
                random_candidates, weights)),
            ("fuse_at_points_joint_label_fusion", lambda: fusion.fuse_at_points(
                candidates, jlf_maps, points)),
            ("label_probability", lambda: fusion.label_probability(candidates, weights, 17))]:
        seconds, peak, _ = timed(function, repeats)
        rows[name] = summary(seconds, peak)
        print(f"N={len(brain)} K={len(labels)} {name}: {rows[name]}", flush=True)
    rows["points"], rows["disputed_fraction"] = len(brain), round(disputed, 3)
    return rows


def fusion_quality(scan, atlases, labels, reference, mask):
    """Mean Dice (28 structures) of each rule, fused at the full grid's voxels."""
    shape = reference.shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    points = ((grid + 0.5) / 2 - 0.5).astype(np.float32)
    candidates = labels.reshape(len(labels), -1)
    jlf = fusion.joint_label_fusion_weights(scan, atlases, mask=mask)
    per_patch = per_patch_errors(scan, atlases)
    window_sums = fusion._pairwise_errors(scan, atlases, 5, 0.01 * np.ptp(scan))
    ratio = np.median(window_sums[:, :, mask] / np.maximum(per_patch[:, :, mask], 1e-6))
    exact = weights_from_errors(per_patch, mask)
    rules = {"majority_vote": None,
             "locally_weighted_voting": fusion.locally_weighted_voting_weights(scan, atlases),
             "joint_label_fusion": jlf,
             "joint_label_fusion_per_patch_standardisation": exact}
    fused, scores = {}, {}
    for name, maps in rules.items():
        fused[name] = fusion.fuse_at_points(candidates, maps, points).reshape(shape)
        per_label = evaluation.dice_per_label(fused[name], reference, BENCHMARK_LABELS)
        scores[name] = round(evaluation.mean_dice(per_label, BENCHMARK_LABELS), 4)
        print(f"{name}: mean Dice {scores[name]}", flush=True)
    single = [evaluation.mean_dice(evaluation.dice_per_label(lab, reference, BENCHMARK_LABELS),
                                   BENCHMARK_LABELS) for lab in labels]
    brain = reference > 0
    agreement = np.mean(fused["joint_label_fusion"][brain]
                        == fused["joint_label_fusion_per_patch_standardisation"][brain])
    scores["single_atlases"] = [round(s, 4) for s in single]
    scores["median_ratio_of_joint_errors_window_sums_to_per_patch"] = round(float(ratio), 3)
    scores["jlf_window_sums_vs_per_patch_label_agreement_in_brain"] = round(float(agreement), 4)
    return scores


def run(data_dir: str, atlases: list, scan_subject: str, points: int, repeats: int) -> dict:
    """The whole part: timings and the fusion rules on ``scan_subject`` with ``atlases`` (subjects
    of ``data_dir``'s images/ and labels/) -> the record of fusion.json's 'speed' key."""
    if scan_subject in atlases:
        raise SystemExit("the speed part's scan must not be one of its atlases")
    _, labels, coarse = load(data_dir, list(atlases) + [scan_subject])
    scan, atlas_images, reference = coarse[-1], coarse[:-1], labels[-1]
    mask = scan > 0
    results = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "grid": list(scan.shape), "atlases": list(atlases), "scan": scan_subject}
    results["weights"] = weight_timings(scan, atlas_images, mask, repeats)
    jlf_maps = fusion.joint_label_fusion_weights(scan, atlas_images, mask=mask)
    results["vote"] = vote_timings(labels[:-1], points, jlf_maps, repeats)
    results["quality"] = fusion_quality(scan, atlas_images, labels[:-1], reference, mask)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results
