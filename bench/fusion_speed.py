"""The ``speed`` part of ``python -m bench.fusion``: speed and memory of
``ltnet_tf.registration.fusion`` at realistic sizes, and its joint label fusion against the exact
(per-patch standardised) formulation.

Atlases sub-01..05 and the scan sub-06, affinely aligned on one 160×192×224 grid (only roughly
aligned: where fusion rules differ most). Weights on the 80×96×112 grid (2×2×2 average pooling),
read at the full grid's voxels and fused there; Dice of the 28 structures against sub-06's labels.
Timings: median and minimum of ``repeats`` calls after an untimed one; numpy's peak memory
(``tracemalloc``; TensorFlow's buffers are not counted).
"""
from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import tensorflow as tf

from ltnet_tf.io import evaluation, volumes
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.registration import fusion

_PER_PATCH_SUMS = {}  # one compiled function per (atlases, grid): timings exclude compilation


def timed(function, repeats) -> dict:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return {"median_seconds": round(float(np.median(times)), 3),
            "min_seconds": round(float(min(times)), 3), "numpy_peak_mb": round(peak)}


def per_patch_errors(scan, atlases, radius=2, min_std=0.01):
    """Joint errors with every patch standardised by its own statistics (Wang et al., ANTs): the
    pairwise sums over 125 shifted copies, XLA-compiled -> [K, K, D, H, W] before the power."""
    size, shape, count = 2 * radius + 1, scan.shape, len(atlases)
    stack = np.concatenate([scan[None], atlases]).astype(np.float64)
    inside = fusion._inside_count(shape, size)
    sums = fusion._window_sums(np.concatenate([stack, stack ** 2]), size)
    mean, mean_square = sums[:count + 1] / inside, sums[count + 1:] / inside
    std = np.sqrt(np.maximum((mean_square - mean ** 2) * inside / (inside - 1),
                             (min_std * np.ptp(scan)) ** 2))
    # Voxels outside the grid are NaN, left out of the sums as ANTs leaves them out.
    padded = np.pad(stack, [(0, 0)] + [(radius, radius)] * 3, constant_values=np.nan)
    pairs = [(i, j) for i in range(count) for j in range(i + 1)]
    offsets = np.array(list(np.ndindex(size, size, size)), np.int32)

    def pair_sums(padded, mean, std, offsets):
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

    compiled = _PER_PATCH_SUMS.setdefault((count, shape), tf.function(pair_sums,
                                                                      jit_compile=True))
    found = compiled(*[tf.constant(a, tf.float32) for a in (padded, mean, std)],
                     tf.constant(offsets)).numpy() / (inside - 1)
    errors = np.empty((count, count, *shape), np.float32)
    for (i, j), pair_sum in zip(pairs, found):
        errors[i, j] = errors[j, i] = pair_sum
    return errors


def run(data_dir: str, atlases: list, scan_subject: str, points: int, repeats: int) -> dict:
    """The whole part on ``scan_subject`` with ``atlases`` -> fusion.json's 'speed' record."""
    if scan_subject in atlases:
        raise SystemExit("the speed part's scan must not be one of its atlases")
    subjects = [*atlases, scan_subject]
    images = np.stack([volumes.load_scan(os.path.join(data_dir, "images", f"{s}.nii.gz")).data
                       for s in subjects]).astype(np.float32)
    labels = np.stack([volumes.load_label_map(os.path.join(data_dir, "labels", f"{s}.nii.gz"))
                       .data for s in subjects]).astype(np.int32)
    images = (images - images.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(
        images, axis=(1, 2, 3), keepdims=True)
    d, h, w = images.shape[1:]
    coarse = images.reshape(len(subjects), d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(2, 4, 6))
    scan, stack, reference, labels = coarse[-1], coarse[:-1], labels[-1], labels[:-1]
    mask = scan > 0
    results = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "grid": list(scan.shape), "atlases": list(atlases), "scan": scan_subject,
               "weights": {}}
    for count in (5, 10):
        many = np.concatenate([stack] * (count // len(stack)))[:count]
        for name, function in [
                ("locally_weighted_voting", lambda: fusion.locally_weighted_voting_weights(
                    scan, many)),
                ("joint_label_fusion", lambda: fusion.joint_label_fusion_weights(scan, many)),
                ("joint_label_fusion_in_mask", lambda: fusion.joint_label_fusion_weights(
                    scan, many, mask=mask)),
                ("joint_errors_window_sums", lambda: fusion._pairwise_errors(
                    scan, many, 5, 0.01 * np.ptp(scan))),
                ("joint_errors_per_patch_standardisation", lambda: per_patch_errors(
                    scan, many))][:3 if count > 5 else 5]:
            results["weights"][f"{name}_K{count}"] = timed(function, repeats)
            print(f"K={count} {name}: {results['weights'][f'{name}_K{count}']}", flush=True)
    jlf = fusion.joint_label_fusion_weights(scan, stack, mask=mask)
    # The first points of the labelled region's bounding box (what a label pull fuses).
    box = np.argwhere(np.any(labels != 0, axis=0))
    in_box = np.zeros(labels.shape[1:], bool)
    in_box[tuple(slice(low, high + 1) for low, high in zip(box.min(0), box.max(0)))] = True
    chosen = np.flatnonzero(in_box.ravel())[:points]
    candidates = labels.reshape(len(labels), -1)[:, chosen]
    rng = np.random.default_rng(0)
    random_candidates = rng.integers(0, 40, size=candidates.shape).astype(np.int32)
    weights = rng.random(candidates.shape).astype(np.float32)
    at = ((np.stack(np.unravel_index(chosen, labels.shape[1:]), -1) + 0.5) / 2 - 0.5).astype(
        np.float32)  # on the 2 mm grid
    results["vote"] = {name: timed(function, repeats) for name, function in [
        ("fuse_labels_majority", lambda: fusion.fuse_labels(candidates)),
        ("fuse_labels_weighted", lambda: fusion.fuse_labels(candidates, weights)),
        ("fuse_labels_weighted_all_disputed", lambda: fusion.fuse_labels(random_candidates,
                                                                          weights)),
        ("fuse_at_points_joint_label_fusion", lambda: fusion.fuse_at_points(candidates, jlf, at)),
        ("label_probability", lambda: fusion.label_probability(candidates, weights, 17))]}
    results["vote"].update(points=len(chosen), disputed_fraction=round(float(np.mean(np.any(
        candidates != candidates[0], axis=0))), 3))
    results["quality"] = quality(scan, stack, labels, reference, mask, jlf)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def quality(scan, atlases, labels, reference, mask, jlf) -> dict:
    """Mean Dice (28 structures) of each rule, fused at the full grid's voxels."""
    shape = reference.shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    points = ((grid + 0.5) / 2 - 0.5).astype(np.float32)
    candidates = labels.reshape(len(labels), -1)
    per_patch = per_patch_errors(scan, atlases)
    window_sums = fusion._pairwise_errors(scan, atlases, 5, 0.01 * np.ptp(scan))
    exact = np.full((len(atlases), *mask.shape), 1.0 / len(atlases), np.float32)
    exact[:, mask] = fusion._solve_weights(per_patch[:, :, mask] ** 2.0, 0.1, clip_negative=True)
    rules = {"majority_vote": None,
             "locally_weighted_voting": fusion.locally_weighted_voting_weights(scan, atlases),
             "joint_label_fusion": jlf, "joint_label_fusion_per_patch_standardisation":
                 fusion._mean_over_patches(exact, mask, 5)}
    fused, scores = {}, {}

    def dice(segmentation):
        return evaluation.mean_dice(evaluation.dice_per_label(segmentation, reference,
                                                              BENCHMARK_LABELS), BENCHMARK_LABELS)
    for name, maps in rules.items():
        fused[name] = fusion.fuse_at_points(candidates, maps, points).reshape(shape)
        scores[name] = round(dice(fused[name]), 4)
        print(f"{name}: mean Dice {scores[name]}", flush=True)
    brain = reference > 0
    scores["single_atlases"] = [round(dice(single), 4) for single in labels]
    scores["median_ratio_of_joint_errors_window_sums_to_per_patch"] = round(float(np.median(
        window_sums[:, :, mask] / np.maximum(per_patch[:, :, mask], 1e-6))), 3)
    scores["jlf_window_sums_vs_per_patch_label_agreement_in_brain"] = round(float(np.mean(
        fused["joint_label_fusion"][brain]
        == fused["joint_label_fusion_per_patch_standardisation"][brain])), 4)
    return scores
