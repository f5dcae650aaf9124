"""Calibration of the alignment's failure check: quality figures of correct and of broken alignments.

    python -m bench.alignment          # ~2 min on 2 CPU cores

Every native scan of ../shared/data (native/ and miccai2012/) is aligned to the atlas; then three
broken inputs made from native sub-06: its header turned upside down, its first two voxel axes
swapped under the same header, and a smooth noise volume of brain size. The thresholds in
``ltnet_tf.alignment.AlignmentSettings`` (brain overlap, intensity correlation) sit between the two
groups. Writes bench/results/alignment.json and alignment.md.
"""
from __future__ import annotations

import os

from bench.provenance import DATA_DIR, command_line, git_commit, write_json

import glob
import time

import numpy as np
from absl import app, flags
from scipy import ndimage

from ltnet_tf import alignment, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
FLAGS = flags.FLAGS


def broken_inputs(scan: data.Volume) -> dict:
    upside_down = scan.affine @ np.diag([1.0, -1.0, -1.0, 1.0])
    upside_down[:3, 3] += scan.affine[:3, :3] @ (np.asarray(scan.shape) - 1) * [0, 1, 1]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random(scan.shape, np.float32), 8)
    brain_box = np.zeros(scan.shape, np.float32)
    brain_box[73:183, 58:198, 73:183] = 1.0
    return {
        "upside-down header": data.Volume(scan.data, upside_down, "upside_down"),
        "axes swapped": data.Volume(np.ascontiguousarray(np.swapaxes(scan.data, 0, 1)),
                                    scan.affine, "axes_swapped"),
        "noise volume": data.Volume(np.where(ndimage.gaussian_filter(brain_box, 3) > 0.5, noise,
                                             0).astype(np.float32), scan.affine, "noise"),
    }


def figures(aligner, scan) -> dict:
    start_wall, start_cpu = time.time(), time.process_time()
    found = aligner.align(scan, force=True)
    return {"brain_overlap": found.brain_overlap, "correlation": found.correlation,
            "ok": found.ok, "seconds": time.time() - start_wall,
            "cpu_seconds": time.process_time() - start_cpu}


def main(argv):
    del argv
    aligner = alignment.AtlasAligner(data.load_scan(os.path.join(FLAGS.data_dir, "atlas.nii.gz")))
    paths = (sorted(glob.glob(os.path.join(FLAGS.data_dir, "native", "images", "*.mgz")))
             + sorted(glob.glob(os.path.join(FLAGS.data_dir, "miccai2012", "images", "*.nii.gz"))))
    correct = {}
    for path in paths:
        correct[data.scan_name(path)] = figures(aligner, data.load_scan(path))
        print(data.scan_name(path), correct[data.scan_name(path)], flush=True)
    sub06 = data.load_scan(os.path.join(FLAGS.data_dir, "native", "images", "sub-06.mgz"))
    broken = {name: figures(aligner, volume) for name, volume in broken_inputs(sub06).items()}
    for name, values in broken.items():
        print(name, values, flush=True)
    settings = aligner.settings.to_dict()
    results = {"command": command_line(), "git_commit": git_commit(),
               "settings": settings, "correct": correct, "broken": broken}
    write_json(results, os.path.join(FLAGS.results_dir, "alignment.json"))

    def span(group, key):
        values = [v[key] for v in group.values()]
        return f"{min(values):.3f}–{max(values):.3f}"

    lines = ["# Alignment: figures of correct and broken alignments", "",
             f"Command: `{results['command']}` at `{results['git_commit'][:12]}`.", "",
             "| group | n | brain overlap | correlation | flagged |", "|---|---|---|---|---|",
             f"| correct (native/, miccai2012/) | {len(correct)} | {span(correct, 'brain_overlap')} "
             f"| {span(correct, 'correlation')} | {sum(not v['ok'] for v in correct.values())} |"]
    lines += [f"| {name} | 1 | {v['brain_overlap']:.3f} | {v['correlation']:.3f} | "
              f"{int(not v['ok'])} |" for name, v in broken.items()]
    lines += ["", f"Thresholds: brain overlap ≥ {settings['min_brain_overlap']}, correlation ≥ "
              f"{settings['min_correlation']}. Alignment of the correct group: median "
              f"{np.median([v['seconds'] for v in correct.values()]):.2f} s wall, "
              f"{np.median([v['cpu_seconds'] for v in correct.values()]):.2f} s CPU per scan."]
    with open(os.path.join(FLAGS.results_dir, "alignment.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
