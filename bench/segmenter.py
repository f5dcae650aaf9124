"""The segmenter trained from the label transfer against the label transfer it learned from, in one
run, on both validation sets (never used in training in any form):

    transfer_1     predict.py --atlas (one atlas, refinement from the identity): the teacher of
                   segmenter_1
    segmenter_1    a run folder's segmenter trained from that one atlas (train.py --segmenter)
    jlf_5          5 atlases (the atlas + sub-01..04), joint label fusion: predict.py's default
    segmenter_5    a run folder's segmenter trained from those 5 atlases

    shared       sub-06, sub-07 of ../shared/data (FreeSurfer labels, on the atlas grid)
    miccai2012   MICCAI 2012 1000, 1001, 1002, 1006, 1007, 1008 (manual labels of another
                 protocol), aligned affinely to the atlas once and cached (bench.anchors)

Dice of the 28 structures of Table 1 on the atlas grid (mean and per structure); seconds per scan
end to end (read the NIfTI, segment, write), the methods interleaved scan by scan so a shared
machine slows them alike; the first call of each (tracing) is paid before the clock, on the atlas
image. ``native`` part: wall and CPU seconds of each stage of a warm native 256³ scan (sub-06,
sub-07 of native/, by ``ltnet_tf.prediction.predictor.StageClock``: read, align, network, refine, labels,
write), for every method. ``ceiling`` part: what the working grid's resolution allows: the true
labels of sub-06/07 pooled x2 (label fractions), read back on the full grid by the segmenter's
read-out (interpolated probabilities) and by the interpolated argmax alone.

    python train.py --segmenter --profile cpu --atlas ATLAS --atlas_labels LABELS \\
        --unlabeled <17 training scans> --model_dir RUN1
    python train.py --segmenter --profile cpu --atlas ATLAS,sub-01..04 --atlas_labels ... \\
        --unlabeled <sub-05 + 12 MICCAI> --model_dir RUN5
    python -m bench.segmenter --seg1 RUN1 --seg5 RUN5

Writes bench/results/segmenter.json ({"sets": {"fstd": {...}, "miccai": {...}}, ...}) and
segmenter.md.
"""
from __future__ import annotations

import os

from ltnet_tf import compat  # noqa: F401
from bench.harness import DATA_DIR, ROOT, command_line, git_commit, write_json

import json
import platform
import time

import numpy as np
from absl import app, flags

from bench import harness
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

METHODS = ("transfer_1", "segmenter_1", "jlf_5", "segmenter_5")
SET_KEYS = {"shared": "fstd", "miccai2012": "miccai"}
EXTRA_ATLASES = ("sub-01", "sub-02", "sub-03", "sub-04")
flags.DEFINE_string("seg1", None, "Run folder of the segmenter trained from one atlas.")
flags.DEFINE_string("seg5", None, "Run folder of the segmenter trained from five atlases.")
flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "segmenter"),
                    "Aligned MICCAI scans, segmentations.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("methods", list(METHODS), "Methods, interleaved scan by scan.")
flags.DEFINE_list("parts", ["dice", "native", "ceiling"], "dice, native, ceiling.")
flags.DEFINE_bool("merge", True, "Keep the entries of an existing segmenter.json of methods "
                  "(and parts) not rerun; each entry records its own command, commit and load.")
flags.DEFINE_integer("native_rounds", 2, "Rounds over the two native scans (the first is not "
                     "counted).")
FLAGS = flags.FLAGS


def atlas_pairs(count: int) -> list:
    pairs = [(os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
              os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))]
    return (pairs + [(os.path.join(FLAGS.data_dir, "images", f"{s}.nii.gz"),
                      os.path.join(FLAGS.data_dir, "labels", f"{s}.nii.gz"))
                     for s in EXTRA_ATLASES])[:count]


class SegmenterMethod:
    """A run folder's segmenter through the product's Predictor, as predict.py --model_dir runs
    it; timed as ``harness.Product``."""

    def __init__(self, model_dir: str):
        from ltnet_tf.prediction import cohort, predictor as prediction

        start = time.time()
        atlases, run = cohort.load_atlases(model_dir)
        self.segmenter = cohort.load_segmenter(run, atlases)
        self.predictor = prediction.Predictor(atlases, segmenter=self.segmenter)
        self.predictor.segment(atlases.primary.image)  # tracing, paid once per process
        self.load_seconds = time.time() - start
        training = self.segmenter.training
        self.train_minutes = training.get("train_minutes")
        self.description = (f"segmenter of a run folder ({len(atlases)} teacher atlas(es), "
                            f"{training.get('fit', {}).get('steps')} steps, "
                            f"{self.train_minutes:.1f} min of training)")

    def segment(self, image_path: str, output_path: str) -> dict:
        start = time.time()
        scan = data.load_scan(image_path)
        result = self.predictor.segment(scan)
        data.save_nifti(result["segmentation"], scan.affine, output_path, header=scan.header)
        return {"segmentation": result["segmentation"], "seconds": time.time() - start,
                "stage_seconds": dict(result["seconds"])}


def make_method(name: str):
    if name == "transfer_1":
        return harness.Product(None, RefinementSettings(), atlases=atlas_pairs(1))
    if name == "jlf_5":
        return harness.Product(None, RefinementSettings(), atlases=atlas_pairs(5), fusion="jlf")
    folder = FLAGS.seg1 if name == "segmenter_1" else FLAGS.seg5
    if not folder:
        raise SystemExit(f"{name}: give its run folder (--{'seg1' if name.endswith('1') else 'seg5'})")
    return SegmenterMethod(folder)


def summarise(records: list) -> dict:
    subjects = {r["subject"]: evaluation.mean_dice(r["dice"], BENCHMARK_LABELS) for r in records}
    return {"mean_dice": float(np.mean(list(subjects.values()))),
            "seconds_per_scan": float(np.mean([r["seconds"] for r in records])),
            "per_subject": subjects,
            "per_subject_seconds": {r["subject"]: r["seconds"] for r in records},
            "per_structure": {structure_name(label): float(np.nanmean(
                [r["dice"][label] for r in records])) for label in BENCHMARK_LABELS}}


def run_dice(methods: dict, payload: dict, results) -> None:
    cases, _ = harness.validation_sets(FLAGS.data_dir, FLAGS.work_dir, ("shared", "miccai2012"))
    records = {}
    for case in cases:
        reference = data.load_label_map(case.label_path).data
        for name, method in methods.items():
            output = os.path.join(FLAGS.work_dir, "segmentations", name, case.set_name,
                                  f"{case.subject}_seg.nii.gz")
            os.makedirs(os.path.dirname(output), exist_ok=True)
            result = method.segment(case.image_path, output)
            dice = evaluation.dice_per_label(result["segmentation"], reference, BENCHMARK_LABELS)
            records.setdefault(SET_KEYS[case.set_name], {}).setdefault(name, []).append(
                {"subject": case.subject, "dice": dice, "seconds": result["seconds"]})
            print(f"[{name}] {case.set_name} {case.subject}: Dice "
                  f"{evaluation.mean_dice(dice, BENCHMARK_LABELS):.3f}, "
                  f"{result['seconds']:.1f} s", flush=True)
        for s, per in records.items():
            for n, r in per.items():
                payload.setdefault("sets", {}).setdefault(s, {})[n] = {
                    **summarise(r), **payload["provenance"]}
        results()


def run_native(methods: dict, payload: dict, results) -> None:
    from ltnet_tf.prediction.predictor import StageClock

    paths = [os.path.join(FLAGS.data_dir, "native", "images", f"{s}.mgz")
             for s in harness.SHARED_SUBJECTS]
    stages = ("read", "align", "network", "refine", "labels", "write")
    found = {name: [] for name in methods}
    folder = os.path.join(FLAGS.work_dir, "native")
    os.makedirs(folder, exist_ok=True)
    for round_ in range(FLAGS.native_rounds):
        for path in paths:
            for name, method in methods.items():
                clock = StageClock()
                with clock("read"):
                    scan = data.load_scan(path)
                result = method.predictor.segment(scan)
                with clock("write"):
                    data.save_nifti(result["segmentation"], scan.affine, os.path.join(
                        folder, f"{name}_{data.scan_name(path)}_seg.nii.gz"), header=scan.header)
                if round_:
                    found[name].append({"seconds": {**clock.seconds, **result["seconds"]},
                                        "cpu_seconds": {**clock.cpu_seconds,
                                                        **result["cpu_seconds"]}})
    payload.setdefault("native", {})
    for name, runs in found.items():
        per_stage = {stage: {"wall_s": float(np.median([r["seconds"].get(stage, 0.0)
                                                        for r in runs])),
                             "cpu_s": float(np.median([r["cpu_seconds"].get(stage, 0.0)
                                                       for r in runs]))} for stage in stages}
        payload["native"][name] = {"stages": per_stage, "scans": len(runs),
                                   "wall_s": sum(s["wall_s"] for s in per_stage.values()),
                                   "cpu_s": sum(s["cpu_s"] for s in per_stage.values()),
                                   **payload["provenance"]}
    results()


def run_ceiling(payload: dict, results) -> None:
    """True labels pooled x2 and read back on the full grid (see the module docstring)."""
    import tensorflow as tf

    from ltnet_tf.config import SegmenterConfig
    from ltnet_tf.registration import transfer
    from ltnet_tf.segmentation import synthesis
    from ltnet_tf.segmentation.network import crop_box
    from ltnet_tf.segmentation.segmenter import Segmenter

    atlas = data.load_scan(os.path.join(FLAGS.data_dir, "atlas.nii.gz"))
    ceiling = {}
    for subject in harness.SHARED_SUBJECTS:
        labels = data.load_label_map(os.path.join(FLAGS.data_dir, "labels",
                                                  f"{subject}.nii.gz")).data
        ids = [0, *sorted(int(i) for i in np.unique(labels) if i != 0)]
        config = SegmenterConfig()
        start, shape = crop_box(np.asarray(atlas.data) != 0, config)
        config = config.replace(atlas_shape=list(labels.shape), crop_start=start,
                                crop_shape=shape, label_ids=ids)
        fractions = tf.constant(synthesis.working_fractions(labels, config), tf.float32) / 255.0
        segmenter = Segmenter.untrained(config)
        read_out = segmenter.segment(fractions, np.eye(4), labels.shape)
        argmax = tf.gather(tf.constant(ids, tf.int32), tf.argmax(fractions, -1,
                                                                  output_type=tf.int32))
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape],
                                    indexing="ij"), -1).reshape(-1, 3)
        coarse = (grid + 0.5) / config.downsample - 0.5
        coarse = np.clip(coarse, 0, np.asarray(config.working_shape) - 1).astype(np.float32)
        voted = transfer.labels_at_points(argmax, tf.constant(coarse[None]))[0].numpy()
        box = np.zeros(labels.shape, np.int32)
        region = tuple(slice(s, s + n) for s, n in zip(start, shape))
        box[region] = voted.reshape(shape)[tuple(slice(0, e.stop - e.start) for e in region)]
        ceiling[subject] = {
            "interpolated_probabilities": evaluation.mean_dice(evaluation.dice_per_label(
                read_out, labels, BENCHMARK_LABELS), BENCHMARK_LABELS),
            "interpolated_argmax": evaluation.mean_dice(evaluation.dice_per_label(
                box, labels, BENCHMARK_LABELS), BENCHMARK_LABELS)}
        print(f"ceiling {subject}: {ceiling[subject]}", flush=True)
    payload["ceiling_factor_2"] = ceiling
    results()


def earlier_results(methods, parts) -> dict:
    """What an earlier segmenter.json holds of methods and parts not rerun now."""
    path = os.path.join(FLAGS.results_dir, "segmenter.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    kept = {"sets": {}, "native": {}}
    if "dice" in parts:
        kept["sets"] = {s: {n: e for n, e in per.items() if n not in methods}
                        for s, per in earlier.get("sets", {}).items()}
    else:
        kept["sets"] = earlier.get("sets", {})
    kept["native"] = {n: e for n, e in earlier.get("native", {}).items()
                      if "native" not in parts or n not in methods}
    for key in ("methods", "train_minutes", "training"):
        kept[key] = {n: e for n, e in earlier.get(key, {}).items() if n not in methods}
    if "ceiling" not in parts and "ceiling_factor_2" in earlier:
        kept["ceiling_factor_2"] = earlier["ceiling_factor_2"]
    return kept


def main(argv):
    del argv
    from bench import segmenter_report

    import tensorflow as tf

    command = command_line()
    for flag, role in (("seg1", "RUN1"), ("seg5", "RUN5")):
        folder = getattr(FLAGS, flag)
        if folder:
            command = command.replace(os.path.abspath(folder), role).replace(
                folder.rstrip("/"), role)
    command = command.replace(FLAGS.work_dir, "WORK")
    provenance = {"command": command, "git_commit": git_commit(),
                  "load_average_1_5_15min": {"start": os.getloadavg()}}
    payload = earlier_results(FLAGS.methods, FLAGS.parts) if FLAGS.merge else {}
    payload.update(provenance, provenance=provenance,
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                           f"CPUs, TF {tf.__version__}")
    os.makedirs(FLAGS.results_dir, exist_ok=True)

    def results():
        provenance["load_average_1_5_15min"]["end"] = os.getloadavg()
        for per in payload.setdefault("sets", {}).values():  # the schema's every method
            for name in METHODS:
                per.setdefault(name, {"mean_dice": None, "seconds_per_scan": None,
                                      "measured": False})
        for name in ("segmenter_1", "segmenter_5"):
            payload.setdefault("train_minutes", {}).setdefault(name, None)
        write_json(payload, os.path.join(FLAGS.results_dir, "segmenter.json"))
        segmenter_report.write_markdown(payload, os.path.join(FLAGS.results_dir, "segmenter.md"))

    if "ceiling" in FLAGS.parts:
        run_ceiling(payload, results)
    methods = {}
    for name in FLAGS.methods:
        methods[name] = make_method(name)
        print(f"=== {name}: {methods[name].description}; loaded in "
              f"{methods[name].load_seconds:.1f} s", flush=True)
    payload.setdefault("methods", {}).update({n: m.description for n, m in methods.items()})
    payload.setdefault("train_minutes", {}).update({n: m.train_minutes for n, m in methods.items()
                                                    if isinstance(m, SegmenterMethod)})
    payload.setdefault("training", {}).update({n: {k: v for k, v in m.segmenter.training.items() if k != "fit"}
                           | {"steps": m.segmenter.training.get("fit", {}).get("steps"),
                              "fit_minutes": m.segmenter.training.get("fit", {}).get("minutes"),
                              "config": m.segmenter.config.to_dict()}
                           for n, m in methods.items() if isinstance(m, SegmenterMethod)})
    if "dice" in FLAGS.parts:
        run_dice(methods, payload, results)
    if "native" in FLAGS.parts:
        run_native(methods, payload, results)
    results()
    print(json.dumps({s: {n: v["mean_dice"] for n, v in per.items()}
                      for s, per in payload.get("sets", {}).items()}))


if __name__ == "__main__":
    app.run(main)
