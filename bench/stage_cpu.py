"""Wall and CPU seconds of each stage of a warm native scan, in one process: what the two cores
of a machine could at best do with a scan if every stage kept both busy.

    python -m bench.stage_cpu --model_dir RUN        # ~1 min on 2 CPU cores; RUN: train.py's folder

sub-06 and sub-07 (native 256³, ../shared/data/native) are read, segmented by
``prediction.Predictor`` (trained network, predict.py's default refinement) and written,
``--repeats`` times each; the first round (tracing, compilation) is left out. Per stage (read,
write, and ``Predictor.segment``'s own stage clock): the median wall seconds and the median CPU
seconds of the process (user + system, all threads). The sum of the CPU seconds over the number
of cores is a floor for a scan's wall time on that machine at these settings, whatever the overlap
of stages or scans. Writes bench/results/stage_cpu.json and stage_cpu.md.
"""
from __future__ import annotations

import os
import tempfile

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, command_line, git_commit, write_json

import numpy as np
from absl import app, flags

from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction.predictor import Predictor, StageClock
from ltnet_tf.prediction.sources import RunFolderNetwork
from ltnet_tf.registration.atlases import AtlasSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("model_dir", None, "A trained run folder (train.py).")
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_integer("repeats", 4, "Rounds over the two scans (the first is not counted).")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
FLAGS = flags.FLAGS
STAGES = ("read", "align", "network", "refine", "labels", "write")


def one_scan(predictor: Predictor, path: str, folder: str) -> dict:
    """A scan read, segmented and its segmentation written as predict.py does -> {'seconds',
    'cpu_seconds'} {stage: s}."""
    clock = StageClock()
    with clock("read"):
        scan = data.load_scan(path)
    result = predictor.segment(scan)
    with clock("write"):
        data.save_nifti(result["segmentation"], scan.affine,
                        os.path.join(folder, data.scan_name(path) + "_seg.nii.gz"),
                        header=scan.header)
    return {"seconds": {**clock.seconds, **result["seconds"]},
            "cpu_seconds": {**clock.cpu_seconds, **result["cpu_seconds"]}}


def main(argv):
    del argv
    atlases = AtlasSet.load([os.path.join(FLAGS.data_dir, "atlas.nii.gz")],
                            [os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")])
    predictor = Predictor(atlases, RunFolderNetwork(FLAGS.model_dir),
                          refinement=RefinementSettings())
    paths = [os.path.join(FLAGS.data_dir, "native", "images", f"{s}.mgz")
             for s in ("sub-06", "sub-07")]
    with tempfile.TemporaryDirectory() as folder:
        rounds = [[one_scan(predictor, path, folder) for path in paths]
                  for _ in range(FLAGS.repeats)]
    warm = [result for round_ in rounds[1:] for result in round_]
    stages = {stage: {"wall_s": float(np.median([r["seconds"][stage] for r in warm])),
                      "cpu_s": float(np.median([r["cpu_seconds"][stage] for r in warm]))}
              for stage in STAGES}
    cores = os.cpu_count()
    cpu_total = sum(s["cpu_s"] for s in stages.values())
    command = command_line().replace(os.path.abspath(FLAGS.model_dir), "RUN")
    config = predictor.network.config
    results = {"commit": git_commit(), "command": command, "cores": cores,
               "model": {"path": "RUN", "downsample": config.downsample, "steps": config.steps},
               "warm_scans": len(warm), "stages": stages,
               "wall_s": sum(s["wall_s"] for s in stages.values()), "cpu_s": cpu_total,
               "floor_s": cpu_total / cores}
    write_json(results, os.path.join(FLAGS.results_dir, "stage_cpu.json"))
    lines = ["# A warm native scan's stages: wall and CPU seconds", "",
             f"sub-06 and sub-07 (native 256³), {len(warm)} warm scans, medians; trained network, "
             f"predict.py's default refinement, one atlas; {cores} cores. RUN: a run folder of "
             f"train.py (working grid 1/{config.downsample}, {config.steps} steps).", "",
             "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {name} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} |" for name, s in stages.items()]
    lines += [f"| **sum** | **{results['wall_s']:.2f}** | **{cpu_total:.2f}** |", "",
              f"CPU seconds over the {cores} cores: **{results['floor_s']:.2f} s**, a floor for a "
              "scan's wall time here at these settings, however stages or scans overlap.", "",
              f"Command: `{results['command']}` at `{results['commit']}`.", ""]
    with open(os.path.join(FLAGS.results_dir, "stage_cpu.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
