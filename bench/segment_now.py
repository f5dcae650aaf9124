"""Segmenting without a trained network, as a new user would on native scans: ``predict.py --atlas
--atlas_labels`` on FreeSurfer's native 256³ volumes of sub-06 and sub-07, scored on their own grids
against their aseg labels (28 structures), with the seconds of each stage per scan.

    python -m bench.segment_now

Writes bench/results/segment_now.json and segment_now.md.
"""
from __future__ import annotations

import os
import shutil

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, command_line, git_commit, portable, write_json

from absl import app, flags

from ltnet_tf.prediction import cohort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_list("subjects", ["sub-06", "sub-07"], "Native subjects (native/images/*.mgz).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "segment_now"),
                    "Where the segmentations go.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    shutil.rmtree(FLAGS.work_dir, ignore_errors=True)
    native = os.path.join(FLAGS.data_dir, "native")
    images = ",".join(os.path.join(native, "images", f"{s}.mgz") for s in FLAGS.subjects)
    result = cohort.predict_files(images, FLAGS.work_dir, os.path.join(native, "labels"),
                                  atlas=os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
                                  atlas_labels=os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))
    scans = {name: {"mean_dice": record["mean_dice"], "seconds": record["seconds"],
                    "alignment_ok": record["alignment_ok"], "warnings": record["warnings"]}
             for name, record in result["scans"].items()}
    results = {"command": command_line(), "git_commit": git_commit(),
               "mean_dice": result["dice"]["mean_dice"], "scans": scans,
               "outputs": sorted(portable(name) for name in os.listdir(FLAGS.work_dir))}
    write_json(results, os.path.join(FLAGS.results_dir, "segment_now.json"))
    stages = list(next(iter(scans.values()))["seconds"])
    lines = ["# Segmenting native scans without a trained network", "",
             f"Command: `{results['command']}` at `{results['git_commit'][:12]}`: "
             "`predict.py --atlas atlas.nii.gz --atlas_labels atlas_labels.nii.gz` on FreeSurfer's "
             "native 256³ volumes, scored on their own grids (28 structures). The first scan pays "
             "for tracing and compilation.", "",
             f"Mean Dice: **{results['mean_dice']:.4f}**.", "",
             "| scan | Dice | alignment ok | " + " | ".join(f"{s} s" for s in stages) + " |",
             "|---|---|---|" + "---|" * len(stages)]
    for name, scan in scans.items():
        lines.append(f"| {name} | {scan['mean_dice']:.4f} | {scan['alignment_ok']} | "
                     + " | ".join(f"{scan['seconds'].get(s, 0):.2f}" for s in stages) + " |")
    lines += ["", "Files written: " + ", ".join(f"`{n}`" for n in results["outputs"]) + "."]
    with open(os.path.join(FLAGS.results_dir, "segment_now.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
