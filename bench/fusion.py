"""Multi-atlas segmentation on real brains: what extra atlases buy the product, what each fusion
rule gives, and ANTs' multi-atlas pipeline (SyN per atlas, then joint label fusion) on the same
atlases, in one run.

Validation sets as ``bench/accuracy.py``; Dice of the 28 structures of Table 1 on the atlas grid at
full resolution:

    shared       sub-06, sub-07 of ../shared/data (on the atlas grid)
    miccai2012   MICCAI 2012 1000, 1001, 1002, 1006, 1007, 1008 (manual labels of another
                 protocol), each aligned affinely to the atlas once and cached

Atlases: the primary atlas of ../shared/data (atlas.nii.gz, atlas_labels.nii.gz) first, then
``--extra_atlases`` (default sub-01..04 of images/ and labels/, on the atlas grid; never a
validation subject). A configuration of N atlases uses the primary one and the first N - 1 extra:

    atlases_<N>          the product (``anchors.Product``: ``ltnet_tf.prediction.predictor.Predictor`` as
                         predict.py runs it) with N atlases fused by its default rule, joint
                         label fusion; ``atlases_1`` is the one-shot result
    atlases_<N>_<rule>   the same with the fusion rule majority, local or jlf
    ..._c<C>_f<F>        with a refinement budget other than predict.py's default: C steps on
                         the coarse grid, F at half resolution (e.g. atlases_5_jlf_c50_f25)
    ants_jlf_<N>         ANTs: SyN per atlas, then ants.joint_label_fusion
    ants_mv_<N>          the same registrations, the warped labels fused by majority vote
    ants_syn_1           the same registration of the primary atlas alone (accuracy.py's ants_syn)

The product's registrations start from the identity and use predict.py's default refinement, unless
``--model_dir`` names a trained run folder: then its atlas is the primary one and its G_F starts
that atlas's registration (the extra atlases still start from the identity).

ANTs is slow: joint label fusion with its default search radius 3 takes ~6 min per atlas and scan
at 1 mm on 2 cores, SyN ~65 s per atlas. ``--ants_subjects`` runs the ANTs configurations on a
subset of the validation subjects, ``--ants_spacing`` registers on coarser grids (the labels and
the fusion stay on the scan's full grid), ``--ants_search_radius`` narrows the search; all are
recorded. The ANTs configurations share one registration of each atlas per scan
(``anchors.AntsAtlasFusions``); each one's seconds are what it would take alone: reading the scan,
registering its atlases and warping them, its own fusion, writing.

Recorded per configuration and set: mean Dice, per subject and per structure; seconds per scan end
to end (reading the NIfTI to writing the segmentation) and per stage; the model/atlas load seconds
(with the first call's tracing, paid once per process); the fusion rule; the folding fraction of
the (primary atlas's) deformation in the brain.

    python -m bench.fusion                                  # everything (hours: ANTs JLF)
    python -m bench.fusion --ants_subjects sub-06,1000      # ANTs on two scans only
    python -m bench.fusion --parts speed                    # ltnet_tf.registration.fusion's own speed, ~1 min

Writes bench/results/fusion.json ({"command", "git_commit", "machine", "sets": {set: {config:
figures}}, "set_info", "speed"}) and fusion.md after every scan, so a long run leaves partial
results (entries of a set not finished say "complete": false).
"""
from __future__ import annotations

import os

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, ROOT, command_line, git_commit, portable, write_json

import gc
import json
import platform
import re

import numpy as np
from absl import app, flags

from bench import anchors, fusion_report
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

SETS = ("shared", "miccai2012")
PARTS = ("dice", "speed")
CONFIGS = ("atlases_1", "atlases_3", "atlases_5", "atlases_5_majority", "atlases_5_jlf",
           "ants_syn_1", "ants_mv_5", "ants_jlf_5")
CONFIG = re.compile(r"^(?:atlases_(?P<count>\d+)(?:_(?P<fusion>majority|local|jlf))?"
                    r"(?:_c(?P<coarse>\d+)_f(?P<fine>\d+))?"
                    r"|ants_(?P<ants>syn|mv|jlf)_(?P<ants_count>\d+))$")
ANTS_RULES = {"syn": "syn", "mv": "majority", "jlf": "jlf"}
PRODUCT_FUSION = "jlf"  # predict.py's default --fusion

flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "fusion"),
                    "Aligned MICCAI scans, segmentations.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("parts", list(PARTS), "dice: the configurations on the validation sets; "
                  "speed: ltnet_tf.registration.fusion's own timings on affinely aligned atlases.")
flags.DEFINE_list("configs", list(CONFIGS), "Configurations, in this order (module docstring); "
                  "the ANTs ones run together, where the first of them is listed.")
flags.DEFINE_list("sets", list(SETS), "Validation sets.")
flags.DEFINE_list("subjects", ["all"], "Validation subjects of any set (e.g. sub-06,1000), or "
                  "all.")
flags.DEFINE_list("extra_atlases", ["sub-01", "sub-02", "sub-03", "sub-04"],
                  "Subjects of images/ and labels/ used as atlases after the primary one, in "
                  "order: a configuration of N atlases takes the first N - 1.")
flags.DEFINE_string("model_dir", None, "A trained run folder: its atlas is the primary one and "
                    "its G_F starts that atlas's registration (default: no network, identity "
                    "start).")
flags.DEFINE_list("ants_subjects", ["all"], "Validation subjects the ANTs configurations run on "
                  "(e.g. sub-06,1000), all, or none.")
flags.DEFINE_float("ants_spacing", None, "ANTs registers images resampled to this voxel size "
                   "in mm (default: the full grid); labels and fusion stay on the full grid.")
flags.DEFINE_bool("ants_histogram_match", True, "Histogram-match each warped atlas to the scan "
                  "before ants.joint_label_fusion (bench.anchors.AntsJointLabelFusion).")
flags.DEFINE_integer("ants_search_radius", 3, "Search radius of ants.joint_label_fusion "
                     "(antspyx's default 3).")
flags.DEFINE_bool("merge", True, "Keep the entries of an existing fusion.json that are not "
                  "rerun (each records its own command and commit).")
flags.DEFINE_list("speed_atlases", ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"],
                  "speed part: atlases (affinely aligned subjects).")
flags.DEFINE_string("speed_scan", "sub-06", "speed part: the scan (never one of its atlases).")
flags.DEFINE_integer("points", 3_000_000, "speed part: points fused in the timing of "
                     "fuse_labels.")
flags.DEFINE_integer("repeats", 5, "speed part: timed calls per measurement (median and "
                     "minimum: other users' jobs slow some calls).")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------- what is run
def parse_config(name: str) -> dict:
    """{'kind': 'product'|'ants', 'count': atlases, 'fusion': rule or None}; SystemExit for a
    name that is not a configuration or needs more atlases than there are."""
    match = CONFIG.match(name)
    available = 1 + len(FLAGS.extra_atlases)
    if match and match["ants"]:
        config = {"kind": "ants", "count": int(match["ants_count"]),
                  "fusion": ANTS_RULES[match["ants"]]}
        valid = (config["count"] == 1) == (config["fusion"] == "syn")
    elif match:
        count = int(match["count"])
        config = {"kind": "product", "count": count,
                  "fusion": match["fusion"] or (PRODUCT_FUSION if count > 1 else None),
                  "refinement": RefinementSettings().replace(
                      coarse_steps=int(match["coarse"]) if match["coarse"] else None,
                      steps=int(match["fine"]) if match["fine"] else None)}
        valid = count > 1 or match["fusion"] is None
    if not match or not valid:
        raise SystemExit(f"unknown configuration {name!r}: atlases_<N>, atlases_<N>_<rule> (rule "
                         f"majority, local or jlf; N >= 2), either with _c<C>_f<F>, "
                         f"ants_jlf_<N>, ants_mv_<N> (N >= 2) or ants_syn_1")
    if not 1 <= config["count"] <= available:
        raise SystemExit(f"{name}: needs {config['count']} atlases; there are {available} (the "
                         f"primary and --extra_atlases {','.join(FLAGS.extra_atlases)})")
    return config


def atlas_pairs() -> list:
    """[(image, label map)]: the primary atlas of --data_dir, then the extra atlases."""
    pairs = [(os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
              os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"))]
    return pairs + [(os.path.join(FLAGS.data_dir, "images", f"{s}.nii.gz"),
                     os.path.join(FLAGS.data_dir, "labels", f"{s}.nii.gz"))
                    for s in FLAGS.extra_atlases]


def check_atlases() -> None:
    extras = FLAGS.extra_atlases
    validation = sorted(set(extras) & set(anchors.SHARED_SUBJECTS))
    if validation:
        raise SystemExit(f"--extra_atlases: {', '.join(validation)} are validation subjects "
                         f"and can never be atlases")
    if len(set(extras)) != len(extras):
        raise SystemExit("--extra_atlases: a subject is listed twice")
    for image, labels in atlas_pairs():
        for path in (image, labels):
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: atlas file not found")


def _wanted(values: list):
    """None for 'all', else the set of names."""
    return None if [v.lower() for v in values] == ["all"] else set(values)


def validation_cases() -> tuple:
    """(cases, {set: info}) of --sets restricted to --subjects; sets left without a subject are
    left out, with a line saying so."""
    wanted = _wanted(FLAGS.subjects)
    cases, info = [], {}
    for s in FLAGS.sets:
        if s == "shared":
            subjects = [x for x in anchors.SHARED_SUBJECTS if wanted is None or x in wanted]
            found = anchors.shared_cases(FLAGS.data_dir, subjects)
            note = {"note": "FreeSurfer aseg labels (the atlas's protocol), aligned to the atlas "
                            "by the data's provider."}
        else:
            subjects = [x for x in anchors.MICCAI_SUBJECTS if wanted is None or x in wanted]
            found, manifest = anchors.miccai_cases(
                FLAGS.data_dir, os.path.join(FLAGS.work_dir, "miccai2012_aligned"), subjects)
            note = {"note": "Manual Neuromorphometrics labels mapped to FreeSurfer IDs (another "
                            "protocol: compares methods, not absolute accuracy); each scan "
                            "aligned affinely to the atlas once by ltnet_tf.registration.alignment; every "
                            "method reads these.", "alignment": manifest}
        if not subjects:
            print(f"set {s}: no subject of --subjects in it; left out", flush=True)
            continue
        cases += found
        info[s] = {"subjects": subjects, **note}
    unknown = (wanted or set()) - {c.subject for c in cases}
    if unknown:
        raise SystemExit(f"--subjects: {', '.join(sorted(unknown))} not in the sets "
                         f"{', '.join(FLAGS.sets)}")
    return cases, info


def ants_cases(cases: list) -> list:
    """The cases --ants_subjects names (all, none, or names of validation subjects)."""
    if [v.lower() for v in FLAGS.ants_subjects] == ["none"]:
        return []
    wanted = _wanted(FLAGS.ants_subjects)
    unknown = (wanted or set()) - {c.subject for c in cases}
    if unknown:
        raise SystemExit(f"--ants_subjects: {', '.join(sorted(unknown))} are not validation "
                         f"subjects of this run")
    return [c for c in cases if wanted is None or c.subject in wanted]


def _portable(text) -> str:
    """``portable``, with folders of this machine outside the repository named by their role."""
    text = portable(text)
    for folder, role in ((FLAGS.model_dir, "RUN"), (FLAGS.work_dir, "WORK"),
                         (FLAGS.results_dir, "RESULTS")):
        if folder and not os.path.abspath(folder).startswith(ROOT + os.sep):
            text = text.replace(os.path.abspath(folder), role)
    return text


# ------------------------------------------------------------------------------- figures
def score(case, result: dict, name: str) -> dict:
    """One scan's record: Dice of the 28 structures, seconds (total and per stage), folding."""
    reference = data.load_label_map(case.label_path).data
    dice = evaluation.dice_per_label(result["segmentation"], reference, BENCHMARK_LABELS)
    stages = result.get("stage_seconds") or result.get("seconds_parts") or {}
    record = {"subject": case.subject, "dice": dice, "seconds": result["seconds"],
              "stages": stages, "folding_fraction": result["folding_fraction"],
              "folding_fractions": result.get("folding_fractions")}
    print(f"[{name}] {case.set_name} {case.subject}: Dice "
          f"{evaluation.mean_dice(dice, BENCHMARK_LABELS):.3f}, {result['seconds']:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + ")", flush=True)
    return record


def summarise(records: list, total: int) -> dict:
    """Figures of one configuration on one set from its per-scan records (``total``: the scans
    it is to run there)."""
    subjects = {r["subject"]: evaluation.mean_dice(r["dice"], BENCHMARK_LABELS) for r in records}
    stages = dict.fromkeys(k for r in records for k in r["stages"])
    return {"mean_dice": float(np.mean(list(subjects.values()))),
            "seconds_per_scan": float(np.mean([r["seconds"] for r in records])),
            "subjects": list(subjects), "complete": len(records) == total,
            "per_subject": subjects,
            "per_subject_seconds": {r["subject"]: r["seconds"] for r in records},
            "per_structure": {structure_name(label): float(np.nanmean(
                [r["dice"][label] for r in records])) for label in BENCHMARK_LABELS},
            "stage_seconds_per_scan": {k: float(np.mean([r["stages"].get(k, 0.0)
                                                         for r in records])) for k in stages},
            "folding_fraction": float(np.mean([r["folding_fraction"] for r in records])),
            "per_subject_folding": {r["subject"]: r["folding_fraction"] for r in records},
            **({"per_subject_atlas_folding": {r["subject"]: r["folding_fractions"]
                                              for r in records}}
               if records[0]["folding_fractions"] is not None else {})}


# ------------------------------------------------------------------------------- results file
class Results:
    """fusion.json as it grows: entries kept from an earlier file (--merge) unless rerun, this
    run's entries added after every scan, then written with fusion.md."""

    def __init__(self, header: dict, set_info: dict, rerun: set):
        self.path = os.path.join(FLAGS.results_dir, "fusion.json")
        self.payload = {**header, "sets": {}, "set_info": {}}
        if FLAGS.merge and os.path.isfile(self.path):
            with open(self.path) as f:
                earlier = json.load(f)
            for s, entries in earlier.get("sets", {}).items():
                kept = {n: e for n, e in entries.items() if (s, n) not in rerun}
                if kept:
                    self.payload["sets"][s] = kept
                    self.payload["set_info"][s] = earlier.get("set_info", {}).get(s)
            speed = earlier.get("speed") or _speed_of_timing_script(earlier)
            if speed:
                self.payload["speed"] = speed
        self.payload["set_info"].update(set_info)

    def set_entry(self, set_name: str, name: str, entry: dict) -> None:
        self.payload["sets"].setdefault(set_name, {})[name] = entry

    def write(self) -> None:
        write_json(self.payload, self.path)
        fusion_report.write_markdown(self.payload, os.path.join(FLAGS.results_dir, "fusion.md"))


def _speed_of_timing_script(earlier: dict):
    """The results of the timing script this benchmark replaced (bench/fusion.py before it had
    parts): its figures as the speed part's."""
    if "weights" not in earlier:
        return None
    return {"command": "python bench/fusion.py", "git_commit": earlier.get("commit", "unknown"),
            **{k: v for k, v in earlier.items() if k != "commit"}}


# ------------------------------------------------------------------------------- evaluation
def _output(name: str, case) -> str:
    return os.path.join(FLAGS.work_dir, "segmentations", name, case.set_name,
                        f"{case.subject}_seg.nii.gz")


def _totals(cases: list) -> dict:
    return {s: sum(c.set_name == s for c in cases) for s in dict.fromkeys(c.set_name
                                                                          for c in cases)}


def make_product(config: dict) -> anchors.Product:
    pairs = atlas_pairs()[:config["count"]]
    fusion = config["fusion"] or PRODUCT_FUSION
    if FLAGS.model_dir:  # the run's atlas is the primary one (cohort.load_atlases)
        return anchors.Product(FLAGS.model_dir, config["refinement"], atlases=pairs[1:] or None,
                               fusion=fusion)
    return anchors.Product(None, config["refinement"], atlases=pairs, fusion=fusion)


def evaluate_product(name: str, config: dict, cases: list, results: Results) -> None:
    load_average = {"start": os.getloadavg()}  # the machine is shared: how busy it was
    segmenter = make_product(config)
    predictor = segmenter.predictor
    print(f"=== {name}: {segmenter.description}; loaded in {segmenter.load_seconds:.1f} s",
          flush=True)
    common = {"kind": "product", "method": segmenter.description,
              "start": "G_F of RUN" if FLAGS.model_dir else "identity",
              "atlases": [{"name": a["name"], "image": _portable(a["image"]),
                           "labels": _portable(a["labels"])} for a in predictor.atlases.records()],
              "fusion": config["fusion"], "model_load_s": segmenter.load_seconds,
              "refinement": predictor.refinement_record(),
              "command": results.payload["command"], "git_commit": results.payload["git_commit"]}
    records, totals = {}, _totals(cases)
    for case in cases:
        result = segmenter.segment(case.image_path, _output(name, case))
        records.setdefault(case.set_name, []).append(score(case, result, name))
        results.set_entry(case.set_name, name, {
            **common, **summarise(records[case.set_name], totals[case.set_name]),
            "load_average_1_5_15min": {**load_average, "end": os.getloadavg()}})
        results.write()
    del segmenter, predictor
    gc.collect()


def evaluate_ants(names: list, cases: list, results: Results) -> None:
    """Every ANTs configuration in ``names`` from one registration of each atlas per scan."""
    load_average = {"start": os.getloadavg()}
    rules = {name: (parse_config(name)["fusion"], parse_config(name)["count"]) for name in names}
    pairs = atlas_pairs()[:max(count for _, count in rules.values())]
    segmenter = anchors.AntsAtlasFusions([p for p, _ in pairs], [p for _, p in pairs], rules,
                                         spacing=FLAGS.ants_spacing,
                                         search_radius=FLAGS.ants_search_radius,
                                         histogram_match=FLAGS.ants_histogram_match)
    print(f"=== {', '.join(names)}: {len(pairs)} atlases registered once per scan, on "
          f"{', '.join(c.subject for c in cases)}; loaded in {segmenter.load_seconds:.1f} s",
          flush=True)
    settings = {"subjects": {s: [c.subject for c in cases if c.set_name == s]
                             for s in _totals(cases)},
                "spacing_mm": FLAGS.ants_spacing, "search_radius": FLAGS.ants_search_radius,
                "histogram_match": FLAGS.ants_histogram_match,
                "intensity_scale": segmenter.intensity_scale,
                "registrations_shared_by": names,
                "seconds_counted": fusion_report.ANTS_SECONDS}
    records, totals = {name: {} for name in names}, _totals(cases)
    for case in cases:
        found = segmenter.segment_all(case.image_path, {n: _output(n, case) for n in names})
        for name in names:
            records[name].setdefault(case.set_name, []).append(score(case, found[name], name))
            rule, count = rules[name]
            results.set_entry(case.set_name, name, {
                "kind": "ants", "method": segmenter.descriptions[name],
                "start": "ANTs affine stage", "fusion": None if rule == "syn" else rule,
                "atlases": [{"name": data.scan_name(p), "image": _portable(p),
                             "labels": _portable(q)} for p, q in pairs[:count]],
                "model_load_s": segmenter.load_seconds, "ants": settings,
                "command": results.payload["command"],
                "git_commit": results.payload["git_commit"],
                **summarise(records[name][case.set_name], totals[case.set_name]),
                "load_average_1_5_15min": {**load_average, "end": os.getloadavg()}})
        results.write()
    del segmenter
    gc.collect()


# ------------------------------------------------------------------------------- main
def run_speed(results: Results) -> None:
    from bench import fusion_speed

    speed = fusion_speed.run(FLAGS.data_dir, FLAGS.speed_atlases, FLAGS.speed_scan, FLAGS.points,
                             FLAGS.repeats)
    results.payload["speed"] = {"command": results.payload["command"],
                                "git_commit": results.payload["git_commit"],
                                "machine": results.payload["machine"], **speed}
    results.write()


def main(argv):
    del argv
    unknown = (set(FLAGS.sets) - set(SETS)) | (set(FLAGS.parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown sets or parts: {', '.join(sorted(unknown))}")
    check_atlases()
    configs = {name: parse_config(name) for name in FLAGS.configs}
    import tensorflow as tf

    header = {"command": _portable(command_line()), "git_commit": git_commit(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"TF {tf.__version__}, "
                         f"GPU: {bool(tf.config.list_physical_devices('GPU'))}"}
    cases, set_info, ants = [], {}, []
    if "dice" in FLAGS.parts:
        cases, set_info = validation_cases()
        ants = ants_cases(cases)
    ants_names = [n for n, c in configs.items() if c["kind"] == "ants"] if ants else []
    if not ants and any(c["kind"] == "ants" for c in configs.values()) and cases:
        print("--ants_subjects none: the ANTs configurations are not run", flush=True)
    rerun = {(c.set_name, n) for n, config in configs.items() if config["kind"] == "product"
             for c in cases} | {(c.set_name, n) for n in ants_names for c in ants}
    results = Results(header, set_info, rerun)
    for name, config in configs.items():
        if config["kind"] == "product" and cases:
            evaluate_product(name, config, cases, results)
        elif ants_names and name == ants_names[0]:
            evaluate_ants(ants_names, ants, results)
    if "speed" in FLAGS.parts:
        run_speed(results)
    results.write()


if __name__ == "__main__":
    app.run(main)
