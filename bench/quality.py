"""The quality estimate (``ltnet_tf.prediction.quality``): its calibration data, its fit and its
scores, from one command.

    python -m bench.quality            # collect (about an hour on 2 shared cores), fit, score

Calibration data: ten subjects of the shared data on their own grids as fit targets and four as
held-out ones (FreeSurfer's 256³ volumes of sub-01..07, MICCAI 2012 scans), clean and in each
degraded copy of ``bench.degradations`` (thick slices, noise, motion ghosts, a cropped field of
view, a lesion, a bias field, another contrast, a mislabelled header orientation, a wrong voxel
size, two combined), segmented by predict.py's default label transfer (refinement, the intensity
model, ``--similarity auto``):

    atlases_1   the data's atlas (the default)
    atlases_3   the data's atlas, sub-01 and sub-02, joint label fusion (sub-01/02 are then no
                targets; three atlases, not five, to keep the run within hours on 2 cores)

The true Dice of the 28 structures of Table 1 against each copy's reference labels (moved with
it) is what the model predicts. Fit: sub-01..05 and MICCAI 1009..1013 (outside the project's
validation split). Scored on: sub-06/07 and MICCAI 1000/1001 (of the validation split), never
used for the fit or for choosing its terms. The left-right flipped header (a mirrored brain, which
no check without a reference can see) is made for the held-out subjects only and scored apart.
Held-out subjects are collected first.

Stages (``--stages``): collect (each scan's record kept in WORK/records, reused when the
product's code is unchanged), fit (writes ltnet_tf/prediction/quality_model.json), score (writes
bench/results/quality.json and quality.md).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import glob
import hashlib
import json
import os
import time

from absl import app, flags

from bench import degradations, harness, quality_fit

# Interleaved (FreeSurfer's, MICCAI's) so that a shorter run still holds both kinds of scan.
FIT_SUBJECTS = ("sub-01", "1009", "sub-02", "1010", "sub-03", "1011", "sub-04", "1012", "sub-05",
                "1013")
HELD_OUT = ("sub-06", "1000", "sub-07", "1001")
EXTRA_ATLASES = ("sub-01", "sub-02")
CONFIGS = {"atlases_1": 1, "atlases_3": 3}

harness.define_flags("quality")
flags.DEFINE_list("stages", ["collect", "fit", "score"], "collect, fit, score.")
flags.DEFINE_list("configs", ["atlases_1"], f"Atlas configurations ({', '.join(CONFIGS)}).")
flags.DEFINE_list("subjects", list(HELD_OUT + FIT_SUBJECTS),
                  "Target subjects (of FIT_SUBJECTS and HELD_OUT).")
flags.DEFINE_list("degradations", list(degradations.DEGRADATIONS + degradations.UNDETECTABLE),
                  "Copies of each subject.")
flags.DEFINE_bool("reuse", True, "Reuse the records of WORK/records made by the same code.")
FLAGS = flags.FLAGS


def source_of(data_dir: str, subject: str) -> tuple:
    """(scan, label map) of a subject on its own grid."""
    if subject.startswith("sub-"):
        return tuple(os.path.join(data_dir, "native", kind, f"{subject}.mgz")
                     for kind in ("images", "labels"))
    return tuple(os.path.join(data_dir, "miccai2012", kind, f"{subject}.nii.gz")
                 for kind in ("images", "labels"))


# The code a record depends on (the segmentation, the signals, the copies): records made by other
# code are made again. The model (quality.py, quality_model.json) is applied at scoring.
RECORD_CODE = ("ltnet_tf/config.py", "ltnet_tf/io", "ltnet_tf/registration", "ltnet_tf/labelling",
               "ltnet_tf/prediction/predictor.py", "ltnet_tf/prediction/quality_evidence.py",
               "ltnet_tf/prediction/quality_signals.py",
               "bench/degradations.py", "bench/contrasts.py")


def code_key() -> str:
    """A digest of ``RECORD_CODE``."""
    digest = hashlib.sha256()
    for part in RECORD_CODE:
        path = os.path.join(harness.ROOT, part)
        files = (sorted(glob.glob(os.path.join(path, "**", "*.py"), recursive=True))
                 if os.path.isdir(path) else [path])
        for name in files:
            with open(name, "rb") as f:
                digest.update(os.path.relpath(name, harness.ROOT).encode() + f.read())
    return digest.hexdigest()[:16]


def group_of(subject: str) -> str:
    return "fit" if subject in FIT_SUBJECTS else "held_out"


# ------------------------------------------------------------------------------ collect
def predictor_for(config: str):
    """predict.py's default label transfer with the atlases of ``config``, traced once."""
    from ltnet_tf.config import RefinementSettings
    from ltnet_tf.prediction import Predictor, cohort

    pairs = harness.atlas_pairs(FLAGS.data_dir, EXTRA_ATLASES)[:CONFIGS[config]]
    atlases, _ = cohort.load_atlases(None, [p for p, _ in pairs], [p for _, p in pairs])
    predictor = Predictor(atlases, None, refinement=RefinementSettings())
    predictor.segment(atlases.primary.image)
    return predictor


def segment_copy(predictor, subject: str, index: int, name: str, scan, labels) -> dict:
    """One copy segmented: its record (signals, true Dice of the 28, seconds per stage)."""
    from ltnet_tf.io import evaluation, volumes
    from ltnet_tf.io.labels import BENCHMARK_LABELS

    made = degradations.degrade(name, scan.data, labels.data, scan.affine,
                                degradations.seed_of(subject, name), index)
    copy = volumes.Volume(made.image, made.affine, f"{subject}_{name}")
    record = {"subject": subject, "group": group_of(subject), "degradation": name,
              "parameters": made.parameters, "shape": list(made.image.shape)}
    start, cpu = time.time(), _cpu()
    try:
        result = predictor.segment(copy)
    except volumes.DataError as error:  # refused, as predict.py would refuse it
        return {**record, "refused": str(error)}
    record["seconds"] = time.time() - start
    record["cpu_seconds"] = _cpu() - cpu
    dice = evaluation.dice_per_label(result["segmentation"], made.labels, BENCHMARK_LABELS)
    quality = result.get("quality") or {}
    record.update(
        stages=dict(result["seconds"]), cpu_stages=dict(result["cpu_seconds"]),
        dice={str(k): float(v) for k, v in dice.items()},
        mean_dice=evaluation.mean_dice(dice, BENCHMARK_LABELS),
        alignment=result["alignment"].to_dict(), similarity=result["similarity"],
        signals=quality.get("signals"))
    return record


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def collect(config: str, subjects, names, records_dir: str, key: str) -> list:
    """Every copy of ``subjects`` segmented with ``config`` (records reused when made by the same
    code); -> the records."""
    from ltnet_tf.io import volumes

    folder = os.path.join(records_dir, config)
    os.makedirs(folder, exist_ok=True)
    predictor, found = None, []
    for index, subject in enumerate(subjects):
        if config != "atlases_1" and subject in EXTRA_ATLASES:
            continue  # an atlas is never its own target
        scan = labels = None
        for name in names:
            if name in degradations.UNDETECTABLE and group_of(subject) == "fit":
                continue
            path = os.path.join(folder, f"{subject}__{name}.json")
            if FLAGS.reuse and os.path.isfile(path):
                with open(path) as f:
                    record = json.load(f)
                if record.get("code") == key:
                    found.append(record)
                    continue
            if predictor is None:
                predictor = predictor_for(config)
            if scan is None:
                image_path, label_path = source_of(FLAGS.data_dir, subject)
                scan, labels = volumes.load_scan(image_path), volumes.load_label_map(label_path)
            number = (FIT_SUBJECTS + HELD_OUT).index(subject)
            record = {**segment_copy(predictor, subject, number, name, scan, labels),
                      "config": config, "code": key}
            harness.write_json(record, path)
            print(f"[{config}] {subject} {name}: "
                  + (f"refused ({record['refused']})" if "refused" in record else
                     f"Dice {record['mean_dice']:.3f}, {record['seconds']:.1f} s, quality "
                     f"{record['stages'].get('quality', 0.0):.2f} s"), flush=True)
            found.append(record)
    return found


def load_records(records_dir: str, key: str, configs) -> list:
    found = []
    for config in configs:
        for path in sorted(glob.glob(os.path.join(records_dir, config, "*.json"))):
            with open(path) as f:
                record = json.load(f)
            if record.get("code") == key or not FLAGS.reuse:
                found.append(record)
    return found


def main(argv):
    del argv
    unknown = set(FLAGS.configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configurations: {', '.join(sorted(unknown))}")
    records_dir = os.path.join(FLAGS.work_dir, "records")
    key = code_key()
    if "collect" in FLAGS.stages:
        for config in FLAGS.configs:
            collect(config, FLAGS.subjects, FLAGS.degradations, records_dir, key)
    records = load_records(records_dir, key, FLAGS.configs)
    provenance = harness.provenance({FLAGS.work_dir: "WORK"})
    if "fit" in FLAGS.stages:
        quality_fit.fit_and_save(records, FIT_SUBJECTS, provenance)
    if "score" in FLAGS.stages:
        quality_fit.score_and_write(records, FLAGS.results_dir, FIT_SUBJECTS, HELD_OUT,
                                    provenance, FLAGS.configs)


if __name__ == "__main__":
    app.run(main)
