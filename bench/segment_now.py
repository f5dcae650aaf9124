"""Segmenting native scans without a trained network, as a new user would (``predict.py --atlas
--atlas_labels``; FreeSurfer's 256³ volumes of sub-06/07, Dice of the 28 structures on their own
grids, seconds per stage). Writes bench/results/segment_now.json and segment_now.md.

    python -m bench.segment_now
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import shutil

from absl import app, flags

from bench import harness
from ltnet_tf.prediction.cohort import predict_files

harness.define_flags("segment_now")
flags.DEFINE_list("subjects", ["sub-06", "sub-07"], "Native subjects (native/images/*.mgz).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    shutil.rmtree(FLAGS.work_dir, ignore_errors=True)
    native = os.path.join(FLAGS.data_dir, "native")
    result = predict_files(",".join(os.path.join(native, "images", f"{s}.mgz")
                                    for s in FLAGS.subjects),
                           FLAGS.work_dir, os.path.join(native, "labels"),
                           atlas=os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
                           atlas_labels=os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))
    scans = {name: {k: record[k] for k in ("mean_dice", "seconds", "alignment_ok", "warnings")}
             for name, record in result["scans"].items()}
    results = {"command": harness.command_line(), "git_commit": harness.git_commit(),
               "mean_dice": result["dice"]["mean_dice"], "scans": scans,
               "outputs": sorted(os.listdir(FLAGS.work_dir))}
    harness.write_json(results, os.path.join(FLAGS.results_dir, "segment_now.json"))
    stages = list(next(iter(scans.values()))["seconds"])
    harness.write_markdown([
        "# Segmenting native scans without a trained network", "",
        f"Command: `{results['command']}` at `{results['git_commit'][:12]}`: "
        "`predict.py --atlas atlas.nii.gz --atlas_labels atlas_labels.nii.gz` on FreeSurfer's "
        "native 256³ volumes, scored on their own grids (28 structures). The first scan pays "
        "for tracing and compilation.", "", f"Mean Dice: **{results['mean_dice']:.4f}**.", "",
        *harness.table(["scan", "Dice", "alignment ok", *(f"{s} s" for s in stages)],
                       [[name, f"{scan['mean_dice']:.4f}", scan["alignment_ok"],
                         *(f"{scan['seconds'].get(s, 0):.2f}" for s in stages)]
                        for name, scan in scans.items()]),
        "", "Files written: " + ", ".join(f"`{n}`" for n in results["outputs"]) + "."],
        os.path.join(FLAGS.results_dir, "segment_now.md"), echo=True)


if __name__ == "__main__":
    app.run(main)
