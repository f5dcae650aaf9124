"""Native space: the same model on scans already on the atlas grid, on FreeSurfer's own 256³
volumes, and on scanner-like variants (another orientation, anisotropic voxels, a 12° oblique tilt,
a tighter field of view), each scored on its own grid (sub-06/07: images/ against labels/,
native/images/*.mgz against native/labels/, and the variants made here from native/).

    python -m bench.native --model_dir RUN [--refine]          # ~10 min on 2 CPU cores

Alignment is timed alone (``align_seconds_per_scan``) and inside a whole ``predict_files`` run
(read, align, network, label pull, write); a training subject is segmented first in each set and
left out, so no figure includes the first call's tracing. Writes bench/results/native.json, .md.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import shutil
import time

import nibabel as nib
import numpy as np
from absl import app, flags

from bench import harness
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction import cohort
from ltnet_tf.registration import alignment

harness.define_flags("native")
flags.DEFINE_string("model_dir", os.path.join(harness.ROOT, "bench", "scratch", "accuracy",
                                              "ltnet"), "The trained run folder.")
flags.DEFINE_list("subjects", ["sub-06", "sub-07"], "Validation subjects.")
flags.DEFINE_bool("refine", False, "Test-time refinement (predict.py's default settings).")
flags.DEFINE_string("warmup_subject", "sub-05", "A training subject segmented first in every set "
                    "and left out of every figure: the first scan of a process pays for tracing.")
FLAGS = flags.FLAGS

# (orientation codes, voxel sizes in mm) of each subject's scanner-like variant
VARIANTS = {"sub-06": ("LPS", (1.2, 0.9, 0.9)), "sub-07": ("RAS", (0.9, 1.2, 1.0))}
TILT_DEGREES = 12.0
FIELD_OF_VIEW_MM = (170.0, 200.0, 180.0)


def oblique_grid(orientation: str, voxel_sizes, centre_mm: np.ndarray) -> tuple:
    """(affine, shape) of a tilted grid in the given orientation around ``centre_mm``."""
    axis = np.array([1.0, 1.0, 0.5]) / np.linalg.norm([1.0, 1.0, 0.5])
    angle = np.deg2rad(TILT_DEGREES)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    world_axis = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0),
                  "I": (2, -1.0)}
    directions = np.zeros((3, 3))  # column i: the world direction of voxel axis i
    for i, code in enumerate(orientation):
        directions[world_axis[code][0], i] = world_axis[code][1]
    linear = tilt @ directions @ np.diag(voxel_sizes)
    shape = tuple(int(round(f / v)) for f, v in zip(FIELD_OF_VIEW_MM, voxel_sizes))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre_mm - linear @ ((np.asarray(shape) - 1) / 2)
    return affine, shape


def make_oblique_variant(subject: str, folder: str) -> tuple:
    """Write the scanner-like variant of a subject's native scan and labels; their paths."""
    scan = data.load_scan(os.path.join(FLAGS.data_dir, "native", "images", f"{subject}.mgz"))
    labels = data.load_label_map(os.path.join(FLAGS.data_dir, "native", "labels", f"{subject}.mgz"))
    brain = np.argwhere(labels.data > 0).mean(0)
    centre = (scan.affine @ [*brain, 1.0])[:3]
    orientation, voxel_sizes = VARIANTS[subject]
    affine, shape = oblique_grid(orientation, voxel_sizes, centre)
    paths = []
    for kind, volume, order in (("images", scan, 1), ("labels", labels, 0)):
        moved = alignment.resample_onto(volume, affine, shape, order=order)
        path = os.path.join(folder, kind, f"{subject}.nii.gz")
        data.save_nifti(moved.data, moved.affine, path,
                        dtype="float32" if kind == "images" else None)
        paths.append(path)
    codes = "".join(nib.aff2axcodes(affine))
    return paths, {"orientation": codes, "voxel_mm": list(voxel_sizes), "shape": list(shape),
                   "tilt_degrees": TILT_DEGREES}


def score(set_name: str, images: list, labels: list) -> dict:
    output_dir = os.path.join(FLAGS.work_dir, f"predict_{set_name}")
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.time()
    result = cohort.predict_files(",".join(images), output_dir, ",".join(labels),
                                  model_dir=FLAGS.model_dir,
                                  options=cohort.PredictOptions(refine=FLAGS.refine, qc=False))
    wall = time.time() - start
    scans = {name: r for name, r in result["scans"].items() if name != FLAGS.warmup_subject}
    per_subject = {name: r["mean_dice"] for name, r in scans.items()}
    seconds = {name: r["seconds"] for name, r in scans.items()}
    return {"mean_dice": float(np.mean(list(per_subject.values()))), "per_subject": per_subject,
            "seconds": seconds, "alignment": {n: r["alignment"] for n, r in scans.items()},
            "wall_time_s": wall}


def time_alignment(paths: list) -> dict:
    """Alignment alone, from the loaded scan (wall and process CPU seconds), twice per scan."""
    aligner = alignment.AtlasAligner(data.load_scan(os.path.join(FLAGS.model_dir, "atlas.nii.gz")))
    clocks = []
    for path in paths:
        scan = data.load_scan(path)
        for _ in range(2):
            clocks.append(harness.Clock())
            with clocks[-1]("align"):
                found = aligner.align(scan)
            assert found.ok, path
    walls = [c.seconds["align"] for c in clocks]
    return {"align_seconds_per_scan": float(np.median(walls)), "align_seconds_all": walls,
            "align_cpu_seconds_per_scan": float(np.median([c.cpu_seconds["align"]
                                                           for c in clocks]))}


def main(argv):
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    subjects = [FLAGS.warmup_subject, *FLAGS.subjects]
    sets = {
        "aligned": ([os.path.join(FLAGS.data_dir, "images", f"{s}.nii.gz") for s in subjects],
                    [os.path.join(FLAGS.data_dir, "labels", f"{s}.nii.gz") for s in subjects]),
        "native": ([os.path.join(FLAGS.data_dir, "native", "images", f"{s}.mgz") for s in subjects],
                   [os.path.join(FLAGS.data_dir, "native", "labels", f"{s}.mgz") for s in subjects]),
    }
    variants, oblique = {}, ([], [])
    for subject in subjects:
        VARIANTS.setdefault(subject, VARIANTS["sub-06"])
        (image, label), variants[subject] = make_oblique_variant(
            subject, os.path.join(FLAGS.work_dir, "oblique"))
        oblique[0].append(image)
        oblique[1].append(label)
    sets["oblique"] = oblique

    from ltnet_tf.prediction.sources import RunFolderNetwork
    start = time.time()
    RunFolderNetwork(FLAGS.model_dir)  # model loading, timed apart (predict_files loads it once per set)
    model_load_s = time.time() - start

    results = {"command": harness.command_line({FLAGS.model_dir: "RUN"}),
               "git_commit": harness.git_commit(), "machine": f"{harness.machine_line()}, "
                                                              f"load average at start "
                                                              f"{os.getloadavg()[0]:.1f}",
               "model_dir_config": harness.read_json(os.path.join(FLAGS.model_dir, "config.json")),
               "subjects": FLAGS.subjects, "warmup_subject": FLAGS.warmup_subject,
               "oblique_variants": {s: v for s, v in variants.items() if s in FLAGS.subjects},
               "refine": FLAGS.refine, "model_load_seconds": model_load_s, "sets": {}}
    for name, (images, labels) in sets.items():
        print(f"=== {name}", flush=True)
        results["sets"][name] = score(name, images, labels)
        print(f"=== {name}: mean Dice {results['sets'][name]['mean_dice']:.4f}", flush=True)
    results.update(time_alignment(sets["native"][0][1:] + sets["oblique"][0][1:]))
    native_totals = [s["total"] for s in results["sets"]["native"]["seconds"].values()]
    results.update(
        dice_aligned=results["sets"]["aligned"]["mean_dice"],
        dice_native=results["sets"]["native"]["mean_dice"],
        dice_oblique=results["sets"]["oblique"]["mean_dice"],
        predict_seconds_per_scan=float(np.mean(native_totals)))
    write_outputs(results)


def write_outputs(results: dict) -> None:
    harness.write_json(results, os.path.join(FLAGS.results_dir, "native.json"))
    subjects, aligned = results["subjects"], results["dice_aligned"]
    lines = ["# Native space: the same model on aligned, native and scanner-like scans", "",
             f"Command: `{results['command']}` at commit `{results['git_commit'][:12]}`; "
             f"{results['machine']}.", "",
             *harness.table(["set", "mean Dice (28 structures)", *subjects,
                             "seconds per scan (total)"],
                            [[name, f"**{r['mean_dice']:.3f}**",
                              *(f"{r['per_subject'][s]:.3f}" for s in subjects),
                              f"{np.mean([r['seconds'][s]['total'] for s in subjects]):.1f}"]
                             for name, r in results["sets"].items()]), "",
             f"- dice_native − dice_aligned = {results['dice_native'] - aligned:+.3f}"
             " (target ≥ −0.01)",
             f"- dice_oblique − dice_aligned = {results['dice_oblique'] - aligned:+.3f}"
             " (target ≥ −0.02)",
             f"- alignment alone: {results['align_seconds_per_scan']:.2f} s wall, "
             f"{results['align_cpu_seconds_per_scan']:.2f} s CPU per scan (median of "
             f"{len(results['align_seconds_all'])}; target ≤ 5 s)",
             f"- predict end to end, native 256³ scan: {results['predict_seconds_per_scan']:.1f} "
             f"s per scan (model loading apart: {results['model_load_seconds']:.1f} s)",
             "", "Oblique variants: " + "; ".join(
                 f"{s}: {v['orientation']}, {v['voxel_mm']} mm, {v['shape']}, tilted "
                 f"{v['tilt_degrees']}°" for s, v in results["oblique_variants"].items()), "",
             "Per-scan stage seconds:", ""]
    lines += [f"- {name} {subject}: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
              for name, r in results["sets"].items() for subject, seconds in r["seconds"].items()]
    harness.write_markdown(lines, os.path.join(FLAGS.results_dir, "native.md"))


if __name__ == "__main__":
    app.run(main)
