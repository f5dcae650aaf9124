"""The segmenter trained from the label transfer against the label transfer it learned from, in one
run, on both validation sets (never used in training in any form):

    transfer_1     predict.py --atlas (one atlas, refinement from the identity): the teacher of
                   segmenter_1
    segmenter_1    a run folder's segmenter trained from that one atlas (train.py --segmenter)
    jlf_5          5 atlases (the atlas + sub-01..04), joint label fusion: predict.py's default
    segmenter_5    a run folder's segmenter trained from those 5 atlases

    shared       sub-06, sub-07 of ../shared/data (FreeSurfer labels, on the atlas grid)
    miccai2012   MICCAI 2012 1000, 1001, 1002, 1006, 1007, 1008 (manual labels of another
                 protocol), aligned affinely to the atlas once and cached (harness.validation_sets)

Dice of the 28 structures of Table 1 on the atlas grid (mean and per structure); seconds per scan
end to end (read the NIfTI, segment, write), the methods interleaved scan by scan so a shared
machine slows them alike; the first call of each (tracing) is paid before the clock, on the atlas
image. ``native`` part: wall and CPU seconds of each stage of a warm native 256³ scan (sub-06,
sub-07 of native/, by ``ltnet_tf.prediction.predictor.StageClock``: read, align, network,
refine, labels, write), for every method. What the working grid's resolution allows (the true
labels pooled x2, read back on the full grid), measured by a ``ceiling`` part up to commit
6c983c5, stays in segmenter.json (``ceiling_factor_2``) and segmenter.md.

    python train.py --segmenter --profile cpu --atlas ATLAS --atlas_labels LABELS \\
        --unlabeled <17 training scans> --model_dir RUN1
    python train.py --segmenter --profile cpu --atlas ATLAS,sub-01..04 --atlas_labels ... \\
        --unlabeled <sub-05 + 12 MICCAI> --model_dir RUN5
    python -m bench.segmenter --seg1 RUN1 --seg5 RUN5

Writes bench/results/segmenter.json ({"sets": {"fstd": {...}, "miccai": {...}}, ...}) and
segmenter.md (``markdown``).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import json
import os

import numpy as np
from absl import app, flags

from bench import harness
from bench.harness import table
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes as data

METHODS = ("transfer_1", "segmenter_1", "jlf_5", "segmenter_5")
NAMES = {"transfer_1": "label transfer, 1 atlas (predict.py --atlas)",
         "segmenter_1": "segmenter trained from 1 atlas",
         "jlf_5": "5 atlases, joint label fusion (predict.py default)",
         "segmenter_5": "segmenter trained from 5 atlases"}
SET_KEYS = {"shared": "fstd", "miccai2012": "miccai"}
SETS = {"fstd": "sub-06/07", "miccai": "MICCAI 2012 (6)"}
EXTRA_ATLASES = ("sub-01", "sub-02", "sub-03", "sub-04")
harness.define_flags("segmenter", merge=True)
flags.DEFINE_string("seg1", None, "Run folder of the segmenter trained from one atlas.")
flags.DEFINE_string("seg5", None, "Run folder of the segmenter trained from five atlases.")
flags.DEFINE_list("methods", list(METHODS), "Methods, interleaved scan by scan.")
flags.DEFINE_list("parts", ["dice", "native"], "dice, native.")
flags.DEFINE_integer("native_rounds", 2, "Rounds over the two native scans (the first is not "
                     "counted).")
FLAGS = flags.FLAGS


def training_record(segmenter) -> dict:
    """A trained segmenter's training record, its fit's steps and minutes, and its config."""
    training, fit = segmenter.training, segmenter.training.get("fit", {})
    return {**{k: v for k, v in training.items() if k != "fit"}, "steps": fit.get("steps"),
            "fit_minutes": fit.get("minutes"), "config": segmenter.config.to_dict()}


def make_method(name: str):
    if name in ("transfer_1", "jlf_5"):
        count = int(name[-1])
        pairs = harness.atlas_pairs(FLAGS.data_dir, EXTRA_ATLASES[:count - 1])
        return harness.Product(None, RefinementSettings(), atlases=pairs, fusion="jlf")
    flag = "seg1" if name == "segmenter_1" else "seg5"
    if not getattr(FLAGS, flag):
        raise SystemExit(f"{name}: give its run folder (--{flag})")
    return harness.Product(getattr(FLAGS, flag), segmenter=True)


def run_dice(methods: dict, payload: dict, results) -> None:
    cases, _ = harness.validation_sets(FLAGS.data_dir, FLAGS.work_dir, ("shared", "miccai2012"))
    records = {}
    for case in cases:
        for name, method in methods.items():
            result = method.segment(case.image_path, case.output(FLAGS.work_dir, name))
            records.setdefault(SET_KEYS[case.set_name], {}).setdefault(name, []).append(
                harness.score(case, result, name))
        for s, per in records.items():
            for n, r in per.items():
                payload.setdefault("sets", {}).setdefault(s, {})[n] = {
                    **harness.dice_figures(r, folding=False), **payload["provenance"]}
        results()


def run_native(methods: dict, payload: dict, results) -> None:
    """Each stage's wall and CPU seconds of warm native scans, median over the counted rounds."""
    from ltnet_tf.prediction.predictor import StageClock

    stages, found = ("read", "align", "network", "refine", "labels", "write"), {}
    folder = os.path.join(FLAGS.work_dir, "native")
    for round_ in range(FLAGS.native_rounds):
        for subject in harness.SHARED_SUBJECTS:
            for name, method in methods.items():
                clock = StageClock()
                with clock("read"):
                    scan = data.load_scan(os.path.join(FLAGS.data_dir, "native", "images",
                                                       f"{subject}.mgz"))
                result = method.predictor.segment(scan)
                with clock("write"):
                    data.save_nifti(result["segmentation"], scan.affine, os.path.join(
                        folder, f"{name}_{subject}_seg.nii.gz"), header=scan.header)
                if round_:
                    found.setdefault(name, []).append(
                        ({**clock.seconds, **result["seconds"]},
                         {**clock.cpu_seconds, **result["cpu_seconds"]}))
    for name, runs in found.items():
        per_stage = {stage: {key: float(np.median([r[i].get(stage, 0.0) for r in runs]))
                             for i, key in enumerate(("wall_s", "cpu_s"))} for stage in stages}
        payload.setdefault("native", {})[name] = {
            "stages": per_stage, "scans": len(runs),
            "wall_s": sum(s["wall_s"] for s in per_stage.values()),
            "cpu_s": sum(s["cpu_s"] for s in per_stage.values()), **payload["provenance"]}
    results()


def earlier_results(methods, parts) -> dict:
    """What an earlier segmenter.json holds of methods and parts not rerun now."""
    earlier = harness.read_json(os.path.join(FLAGS.results_dir, "segmenter.json"))
    if not earlier:
        return {}
    kept = {"sets": {s: {n: e for n, e in per.items() if "dice" not in parts or n not in methods}
                     for s, per in earlier.get("sets", {}).items()},
            "native": {n: e for n, e in earlier.get("native", {}).items()
                       if "native" not in parts or n not in methods}}
    for key in ("methods", "train_minutes", "training"):
        kept[key] = {n: e for n, e in earlier.get(key, {}).items() if n not in methods}
    if "ceiling_factor_2" in earlier:
        kept["ceiling_factor_2"] = earlier["ceiling_factor_2"]
    return kept


# ------------------------------------------------------------------------------- segmenter.md
def _figure(entry, key, digits=3):
    if entry and entry.get("measured") is False:
        return "not measured"
    return "—" if not entry or entry.get(key) is None else f"{entry[key]:.{digits}f}"


def targets(payload: dict) -> list:
    """[(what, measured, met)] of the targets: +0.02 over transfer_1 at <= its seconds;
    >= jlf_5 at <= 1/3 of its seconds; native CPU <= 2/3 of transfer_1's; training <= 60 min."""
    rows = []
    for key, label in SETS.items():
        per = payload.get("sets", {}).get(key, {})
        for ours, theirs, gain_target, time_target, time_text in (
                ("segmenter_1", "transfer_1", 0.02, 1.0, "transfer_1's"),
                ("segmenter_5", "jlf_5", 0.0, 1 / 3, "1/3 of jlf_5's")):
            if any(per.get(n, {}).get("mean_dice") is None for n in (ours, theirs)):
                continue
            gain = per[ours]["mean_dice"] - per[theirs]["mean_dice"]
            ratio = per[ours]["seconds_per_scan"] / per[theirs]["seconds_per_scan"]
            rows += [(f"{label}: {ours} >= {theirs}" + (f" + {gain_target}" if gain_target
                                                        else ""), f"{gain:+.3f}",
                      gain >= gain_target),
                     (f"{label}: {ours} s/scan <= {time_text}", f"x{ratio:.2f}",
                      ratio <= time_target)]
    native = payload.get("native", {})
    if "segmenter_1" in native and "transfer_1" in native:
        ratio = native["segmenter_1"]["cpu_s"] / native["transfer_1"]["cpu_s"]
        rows.append(("native scan: segmenter_1 CPU s <= 2/3 of transfer_1's", f"x{ratio:.2f}",
                     ratio <= 2 / 3))
    return rows + [(f"{name}: training <= 60 min", f"{minutes:.1f} min", minutes <= 60)
                   for name, minutes in payload.get("train_minutes", {}).items()
                   if minutes is not None]


def _training_line(name: str, entry: dict) -> str:
    teacher, examples = entry.get("teacher", {}), entry.get("examples", {})
    return (f"- {name}: {entry.get('train_minutes', 0):.1f} min wall in all (teacher "
            f"{teacher.get('minutes', 0):.1f} min, fitting {entry.get('fit_minutes', 0):.1f} "
            f"min, {entry.get('steps')} steps); teacher atlases "
            f"{', '.join(teacher.get('atlases', []))}"
            + (f" fused by {teacher['fusion']}" if teacher.get("fusion") else "")
            + f"; {len(examples.get('labelled', []))} labelled, "
            f"{len(examples.get('pseudo', []))} pseudo-labelled scans, "
            f"{len(examples.get('shapes', []))} shapes; synthesised share "
            f"{entry['config']['synth_fraction']}")


def _loads(values) -> str:
    return "?" if not values else "/".join(f"{v:.1f}" for v in values)


def _runs(sets: dict, native: dict) -> list:
    measured = {}
    for per in [*sets.values(), native]:
        for name, entry in per.items():
            if "command" in entry:
                load = entry.get("load_average_1_5_15min", {})
                measured.setdefault((entry["command"], entry.get("git_commit")), set()).add(
                    f"{name} (load {_loads(load.get('start'))} -> {_loads(load.get('end'))})")
    return [f"- `{command}` at `{commit}`: {', '.join(sorted(names))}"
            for (command, commit), names in measured.items()]


def markdown(payload: dict) -> list:
    sets, native = payload.get("sets", {}), payload.get("native") or {}
    lines = ["# A segmenter trained from the label transfer, against the label transfer", ""]
    if sets:
        lines += ["Dice of the 28 structures on the atlas grid; seconds per scan end to end "
                  "(read, segment, write; methods interleaved scan by scan).", "", *table(
                      ["method", *(c for v in SETS.values() for c in (f"Dice {v}", "s/scan"))],
                      [[label, *(c for key in SETS for entry in [sets.get(key, {}).get(name)]
                                 for c in (_figure(entry, "mean_dice"),
                                           _figure(entry, "seconds_per_scan", 2)))]
                       for name, label in NAMES.items() if any(name in p for p in sets.values())]),
                  ""]
    rows = targets(payload)
    if rows:
        lines += ["## Targets", "", *table(["target", "measured", "met"], [
            [what, value, "yes" if met else "**no**"] for what, value, met in rows]), ""]
    if native:
        stages = list(next(iter(native.values()))["stages"])
        lines += ["## A warm native 256³ scan (sub-06, sub-07): CPU seconds per stage", "",
                  *table(["method", *stages, "**sum CPU s**", "wall s"], [
                      [name, *(f"{e['stages'][s]['cpu_s']:.2f}" for s in stages),
                       f"**{e['cpu_s']:.2f}**", f"{e['wall_s']:.2f}"]
                      for name, e in native.items()]),
                  ""]
    if sets:
        lines += ["## Per structure (mean over the set's subjects)", ""]
        for key, label in SETS.items():
            per = {n: e for n, e in sets.get(key, {}).items() if e.get("per_structure")}
            if sets.get(key):
                lines += [f"### {label}", "", *harness.per_structure(per), ""]
    ceiling = payload.get("ceiling_factor_2")
    if ceiling:
        lines += ["## What half resolution allows", "", "True labels pooled x2 (label fractions "
                  "on the working grid), read back on the full grid:", "", *table(
                      ["subject", "interpolated probabilities (the segmenter's read-out)",
                       "interpolated argmax only"],
                      [[s, f"{v['interpolated_probabilities']:.3f}",
                        f"{v['interpolated_argmax']:.3f}"] for s, v in ceiling.items()]), ""]
    if payload.get("training"):
        lines += ["## Training", "", *(_training_line(n, e)
                                       for n, e in payload["training"].items()), ""]
    runs = _runs(sets, native)
    if runs:
        lines += ["## Runs", "", *runs, ""]
    load = payload.get("load_average_1_5_15min", {})
    return lines + [
        f"Machine: {payload.get('machine')}; load average (1, 5, 15 min) at the start "
        f"{_loads(load.get('start'))}, at the end {_loads(load.get('end'))} (a shared machine: "
        "seconds are upper bounds; ratios within this run are fair).", "",
        f"Command: `{payload.get('command')}` at `{payload.get('git_commit')}`."]


def main(argv):
    del argv
    if set(FLAGS.parts) - {"dice", "native"}:
        raise SystemExit(f"unknown parts: {', '.join(FLAGS.parts)} (dice, native)")
    provenance = harness.provenance({FLAGS.seg1: "RUN1", FLAGS.seg5: "RUN5",
                                     FLAGS.work_dir: "WORK"})
    payload = earlier_results(FLAGS.methods, FLAGS.parts) if FLAGS.merge else {}
    payload.update(provenance, provenance=provenance, machine=harness.machine_line())

    def results():
        provenance["load_average_1_5_15min"]["end"] = os.getloadavg()
        for per in payload.setdefault("sets", {}).values():  # the schema's every method
            for name in METHODS:
                per.setdefault(name, {"mean_dice": None, "seconds_per_scan": None,
                                      "measured": False})
        for name in ("segmenter_1", "segmenter_5"):
            payload.setdefault("train_minutes", {}).setdefault(name, None)
        harness.write_results(payload, markdown, os.path.join(FLAGS.results_dir, "segmenter"))

    methods = {name: make_method(name) for name in FLAGS.methods}
    trained = {n: m for n, m in methods.items() if m.segmenter is not None}
    for name, method in methods.items():
        print(f"=== {name}: {method.description}; loaded in {method.load_seconds:.1f} s",
              flush=True)
    payload.setdefault("methods", {}).update({n: m.description for n, m in methods.items()})
    payload.setdefault("train_minutes", {}).update({n: m.train_minutes for n, m in trained.items()})
    payload.setdefault("training", {}).update({n: training_record(m.segmenter)
                                               for n, m in trained.items()})
    if "dice" in FLAGS.parts:
        run_dice(methods, payload, results)
    if "native" in FLAGS.parts:
        run_native(methods, payload, results)
    results()
    print(json.dumps({s: {n: v["mean_dice"] for n, v in per.items()}
                      for s, per in payload.get("sets", {}).items()}))


if __name__ == "__main__":
    app.run(main)
