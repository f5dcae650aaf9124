"""Robustness to a scanner/converter artefact: a few extreme voxels must not move the segmentation.

sub-06 of ../shared/data (on the atlas grid, and its native 256³ FreeSurfer volume), as it is and
as a user may receive it: intensities x4 stored as int16 (0..~1000), plus 60 background voxels at
+-32,000. Each is segmented the way predict.py does (``ltnet_tf.prediction.predictor.Predictor``): with a
trained run folder's G_F alone, with G_F and predict.py's default refinement, and without a network
(refinement from the identity); Dice on the 28 structures against sub-06's labels, and the
difference between the clean and the artefact version (target: within 0.005).

    python -m bench.robustness --model_dir RUN

Writes bench/results/robustness.json and robustness.md.
"""
from __future__ import annotations

import os

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, command_line, git_commit, portable, write_json

import numpy as np
from absl import app, flags

from bench import anchors
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("model_dir", None, "A trained run folder (the README's CPU recipe).",
                    required=True)
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "robustness"),
                    "Scratch folder for the artefact scans and segmentations.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_integer("outliers", 60, "Background voxels set to +-32,000.")
FLAGS = flags.FLAGS


def with_artefact(scan: data.Volume, path: str, count: int, seed: int = 0) -> str:
    """``scan`` x4 as int16 with ``count`` background voxels at +-32,000, written to ``path``."""
    values = np.rint(np.asarray(scan.data, np.float64) * 4 * (255 if scan.data.max() <= 1 else 1))
    values = values.astype(np.int16)
    rng = np.random.default_rng(seed)
    background = np.flatnonzero(values.ravel() == 0)
    chosen = rng.choice(background, size=count, replace=False)
    flat = values.reshape(-1)
    flat[chosen[: count // 2]] = 32000
    flat[chosen[count // 2:]] = -32000
    data.save_nifti(values, scan.affine, path, dtype=np.int16)
    return path


def cases() -> dict:
    """{case: (clean scan path, artefact scan path, reference label path)}."""
    cases = {}
    for case, image, labels in (
            ("atlas grid", os.path.join(FLAGS.data_dir, "images", "sub-06.nii.gz"),
             os.path.join(FLAGS.data_dir, "labels", "sub-06.nii.gz")),
            ("native 256³", os.path.join(FLAGS.data_dir, "native", "images", "sub-06.mgz"),
             os.path.join(FLAGS.data_dir, "native", "labels", "sub-06.mgz"))):
        artefact = os.path.join(FLAGS.work_dir, f"{case.split()[0]}_artefact.nii.gz")
        with_artefact(data.load_scan(image), artefact, FLAGS.outliers)
        cases[case] = (image, artefact, labels)
    return cases


def main(argv):
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    atlas = (os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
             os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))
    segmenters = {"network alone": lambda: anchors.Product(FLAGS.model_dir, None),
                  "network + refinement": lambda: anchors.Product(FLAGS.model_dir,
                                                                  RefinementSettings()),
                  "identity + refinement": lambda: anchors.Product(None, RefinementSettings(),
                                                                   atlases=[atlas])}
    results = {"command": command_line(), "git_commit": git_commit(),
               "model_dir": portable(os.path.abspath(FLAGS.model_dir)), "outliers": FLAGS.outliers,
               "cases": {}}
    inputs = cases()
    for method, make in segmenters.items():
        segmenter = make()
        for case, (clean, artefact, labels) in inputs.items():
            reference = data.load_label_map(labels).data
            dice = {}
            for version, path in (("clean", clean), ("artefact", artefact)):
                output = os.path.join(FLAGS.work_dir, f"{method}-{case}-{version}_seg.nii.gz"
                                      .replace(" ", "_"))
                segmentation = segmenter.segment(path, output)["segmentation"]
                dice[version] = evaluation.mean_dice(
                    evaluation.dice_per_label(segmentation, reference, BENCHMARK_LABELS),
                    BENCHMARK_LABELS)
            dice["difference"] = dice["artefact"] - dice["clean"]
            results["cases"].setdefault(case, {})[method] = dice
            print(f"{case}, {method}: clean {dice['clean']:.4f}, artefact {dice['artefact']:.4f} "
                  f"({dice['difference']:+.4f})", flush=True)
    write_json(results, os.path.join(FLAGS.results_dir, "robustness.json"))
    lines = ["# Robustness: a few extreme voxels", "",
             f"Command: `{results['command']}` at `{results['git_commit'][:12]}`; run folder "
             f"{results['model_dir']} (the README's CPU recipe).", "",
             f"sub-06 x4 stored as int16, with {FLAGS.outliers} background voxels at +-32,000, "
             "against the clean scan: mean Dice of the 28 structures against sub-06's labels.", "",
             "| scan | method | clean | with artefact | difference |", "|---|---|---|---|---|"]
    for case, methods in results["cases"].items():
        for method, dice in methods.items():
            lines.append(f"| {case} | {method} | {dice['clean']:.4f} | {dice['artefact']:.4f} | "
                         f"{dice['difference']:+.4f} |")
    with open(os.path.join(FLAGS.results_dir, "robustness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
