"""Calibration of the alignment's failure check: figures of correct and of broken alignments.

    python -m bench.alignment          # ~5 min on 2 CPU cores

Every native scan of the data (native/ and miccai2012/) is aligned to the atlas, as it is and in two
other contrasts made inside its brain mask: inverted (T2-like) and FLAIR-like. Then broken inputs
made from native sub-06: its header upside down, two voxel axes swapped under the same header, a
smooth noise volume of brain size (box-shaped, and inside sub-06's brain mask); and sub-06 x4 as
int16 with 60 background voxels at +-32,000, which must align as sub-06 does. The thresholds of
``ltnet_tf.registration.alignment.AlignmentSettings`` sit between the groups. Writes
bench/results/alignment.json and alignment.md.
"""
from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags
from scipy import ndimage

from bench import harness
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction.predictor import StageClock
from ltnet_tf.registration import alignment

harness.define_flags("alignment", work=False)
FLAGS = flags.FLAGS


def broken_inputs(scan: data.Volume) -> dict:
    upside_down = scan.affine @ np.diag([1.0, -1.0, -1.0, 1.0])
    upside_down[:3, 3] += scan.affine[:3, :3] @ (np.asarray(scan.shape) - 1) * [0, 1, 1]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random(scan.shape, np.float32), 8)
    brain_box = np.zeros(scan.shape, np.float32)
    brain_box[73:183, 58:198, 73:183] = 1.0
    brain = scan.data > 0
    return {
        "upside-down header": data.Volume(scan.data, upside_down, "upside_down"),
        "axes swapped": data.Volume(np.ascontiguousarray(np.swapaxes(scan.data, 0, 1)),
                                    scan.affine, "axes_swapped"),
        "noise volume": data.Volume(np.where(ndimage.gaussian_filter(brain_box, 3) > 0.5, noise,
                                             0).astype(np.float32), scan.affine, "noise"),
        "brain-shaped noise": data.Volume(np.where(brain, ndimage.gaussian_filter(
            np.random.default_rng(0).random(scan.shape, np.float32), 3), 0).astype(np.float32),
            scan.affine, "brain_noise"),
    }


def other_contrasts(scan: data.Volume) -> dict:
    """The scan inverted inside its brain mask (T2-like) and FLAIR-like (a tent map: intensity
    rises to the grey-matter level, then falls, so white matter ends darker than grey)."""
    brain = scan.data > 0
    relative = scan.data / np.percentile(scan.data[brain], 99)
    return {"inverted": np.where(brain, scan.data.max() - scan.data, 0),
            "flair-like": np.where(brain, np.where(relative < 0.6, relative, 1.2 - relative), 0)}


def with_outliers(scan: data.Volume) -> data.Volume:
    """x4 as int16 (as a 0..968 scanner scale), 60 background voxels at +-32,000."""
    values = np.round(scan.data * 4).astype(np.int16)
    background = np.flatnonzero(values.ravel() == 0)
    picked = np.random.default_rng(0).choice(background, 60, replace=False)
    values.ravel()[picked] = np.where(np.arange(60) % 2, 32000, -32000)
    return data.Volume(values, scan.affine, "outliers")


def figures(aligner, scan) -> dict:
    clock = StageClock()
    with clock("align"):
        found = aligner.align(scan, force=True)
    return {"brain_overlap": found.brain_overlap, "correlation": found.correlation,
            "ok": found.ok, "diagnosis": found.diagnosis, "seconds": clock.seconds["align"],
            "cpu_seconds": clock.cpu_seconds["align"]}


def main(argv):
    del argv
    aligner = alignment.AtlasAligner(data.load_scan(os.path.join(FLAGS.data_dir, "atlas.nii.gz")))
    paths = (sorted(glob.glob(os.path.join(FLAGS.data_dir, "native", "images", "*.mgz")))
             + sorted(glob.glob(os.path.join(FLAGS.data_dir, "miccai2012", "images", "*.nii.gz"))))
    correct, contrasts = {}, {"inverted": {}, "flair-like": {}}
    for path in paths:
        scan = data.load_scan(path)
        correct[data.scan_name(path)] = figures(aligner, scan)
        print(data.scan_name(path), correct[data.scan_name(path)], flush=True)
        for contrast, values in other_contrasts(scan).items():
            moved = data.Volume(values.astype(np.float32), scan.affine, contrast)
            contrasts[contrast][data.scan_name(path)] = figures(aligner, moved)
            print(" ", contrast, contrasts[contrast][data.scan_name(path)], flush=True)
    sub06 = data.load_scan(os.path.join(FLAGS.data_dir, "native", "images", "sub-06.mgz"))
    broken = {name: figures(aligner, volume) for name, volume in broken_inputs(sub06).items()}
    outliers = {"sub-06": correct["sub-06"], "sub-06 x4 int16 + 60 voxels at +-32,000":
                figures(aligner, with_outliers(sub06))}
    settings = aligner.settings.to_dict()
    results = {"command": harness.command_line(), "git_commit": harness.git_commit(),
               "settings": settings, "correct": correct, "contrasts": contrasts,
               "broken": broken, "outliers": outliers}
    harness.write_json(results, os.path.join(FLAGS.results_dir, "alignment.json"))

    def row(name, group):
        def span(key):
            return f"{min(v[key] for v in group.values()):.3f}–" \
                   f"{max(v[key] for v in group.values()):.3f}"
        return [name, len(group), span("brain_overlap"), span("correlation"),
                sum(not v["ok"] for v in group.values()),
                ", ".join(sorted({v["diagnosis"] for v in group.values()}))]

    harness.write_markdown([
        "# Alignment: figures of correct and broken alignments", "",
        f"Command: `{results['command']}` at `{results['git_commit'][:12]}`.", "",
        *harness.table(["group", "n", "brain overlap", "correlation", "flagged", "diagnosis"], [
            row("correct (native/, miccai2012/)", correct),
            row("inverted contrast (T2-like), same scans", contrasts["inverted"]),
            row("FLAIR-like contrast, same scans", contrasts["flair-like"]),
            *(row(name, {name: v}) for name, v in {**broken, **outliers}.items())]),
        "", f"Thresholds: brain overlap ≥ {settings['min_brain_overlap']}, correlation ≥ "
        f"{settings['min_correlation']}; a good overlap with a correlation under "
        f"{settings['max_contrast_correlation']} is diagnosed 'contrast', every other "
        f"failure 'orientation'. Alignment of the correct group: median "
        f"{np.median([v['seconds'] for v in correct.values()]):.2f} s wall, "
        f"{np.median([v['cpu_seconds'] for v in correct.values()]):.2f} s CPU per scan."],
        os.path.join(FLAGS.results_dir, "alignment.md"))


if __name__ == "__main__":
    app.run(main)
