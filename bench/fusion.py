"""Multi-atlas segmentation: what extra atlases and each fusion rule give the product, and ANTs'
multi-atlas pipeline on the same atlases, in one run (sets and Dice as ``bench.accuracy``). N
atlases: the data's primary atlas, then the first N - 1 of ``--extra_atlases`` (sub-01..04):

    atlases_<N>[_<rule>]  the product (``harness.Product``) with N atlases fused by its default
                          rule (joint label fusion) or majority, local or jlf; ``atlases_1`` is
                          the one-shot result; ``..._c<C>_f<F>``: another refinement budget
    ants_jlf_<N>, ants_mv_<N>, ants_syn_1
                          ANTs SyN per atlas, then joint label fusion / majority vote / none
                          (``anchors.AntsAtlases``: one registration per atlas and scan, shared)

``--model_dir``: a trained run's atlas is the primary one and its G_F starts that atlas's
registration (the others start from the identity). ANTs is slow (~6 min per atlas and scan for
JLF): ``--ants_subjects`` runs it on a subset, ``--ants_spacing`` registers on coarser grids.

    python -m bench.fusion --ants_subjects sub-06,1000      # ANTs on two scans only

Writes bench/results/fusion.json and fusion.md after every scan ("complete": false until done).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import gc
import os
import re

import numpy as np
from absl import app, flags

from bench import anchors, harness
from bench.harness import cell, table
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes

SETS = ("shared", "miccai2012")
CONFIGS = ("atlases_1", "atlases_3", "atlases_5", "atlases_5_majority", "atlases_5_jlf",
           "ants_syn_1", "ants_mv_5", "ants_jlf_5")
CONFIG = re.compile(r"^(?:atlases_(?P<count>\d+)(?:_(?P<fusion>majority|local|jlf))?"
                    r"(?:_c(?P<coarse>\d+)_f(?P<fine>\d+))?"
                    r"|ants_(?P<ants>syn|mv|jlf)_(?P<ants_count>\d+))$")
ANTS_RULES = {"syn": "syn", "mv": "majority", "jlf": "jlf"}
PRODUCT_FUSION, ONE_SHOT = "jlf", "atlases_1"  # predict.py's default --fusion; one atlas
ANTS_SECONDS = ("what each ANTs configuration would take alone: reading the scan (and resampling "
                "it to the registration grid), SyN of each of its atlases and the warp of their "
                "labels (for joint label fusion also of their images), its own fusion, writing "
                "its segmentation. The registrations run once per scan and are shared by the "
                "ANTs configurations of the run; ants_syn_1 is the primary atlas's registration.")

harness.define_flags("fusion", merge=True)
flags.DEFINE_list("parts", ["dice"], "Parts to run: dice (the configurations on the "
                  "validation sets).")
flags.DEFINE_list("configs", list(CONFIGS), "Configurations, in this order; the ANTs ones run "
                  "together, where the first of them is listed.")
flags.DEFINE_list("sets", list(SETS), "Validation sets.")
flags.DEFINE_list("subjects", ["all"], "Validation subjects of any set (sub-06,1000), or all.")
flags.DEFINE_list("extra_atlases", ["sub-01", "sub-02", "sub-03", "sub-04"],
                  "Subjects used as atlases after the primary one, in order.")
flags.DEFINE_string("model_dir", None, "A trained run folder: its atlas is the primary one and "
                    "its G_F starts that atlas's registration (default: identity start).")
flags.DEFINE_list("ants_subjects", ["all"], "Subjects the ANTs configurations run on, all or none.")
flags.DEFINE_float("ants_spacing", None, "ANTs registers images resampled to this voxel size "
                   "in mm (default: the full grid).")
flags.DEFINE_bool("ants_histogram_match", True, "Histogram-match each warped atlas to the scan "
                  "before ants.joint_label_fusion.")
flags.DEFINE_integer("ants_search_radius", 3, "Search radius of ants.joint_label_fusion.")
FLAGS = flags.FLAGS


def parse_config(name: str) -> dict:
    """{'kind': 'product'|'ants', 'count', 'fusion'[, 'refinement']}; SystemExit if unknown."""
    match, available = CONFIG.match(name), 1 + len(FLAGS.extra_atlases)
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
        raise SystemExit(f"{name}: needs {config['count']} atlases; there are {available}")
    return config


def atlas_pairs() -> list:
    return harness.atlas_pairs(FLAGS.data_dir, FLAGS.extra_atlases)


def _wanted(values: list, cases=None):
    """None for 'all', else the names (checked against ``cases`` when given)."""
    if [v.lower() for v in values] == ["all"]:
        return None
    unknown = set(values) - {c.subject for c in cases} if cases is not None else set()
    if unknown - {"none"}:
        raise SystemExit(f"{', '.join(sorted(unknown))}: not validation subjects of this run")
    return set(values)


def _portable(text) -> str:
    return harness.portable(text, {FLAGS.model_dir: "RUN", FLAGS.work_dir: "WORK"})


class Results:
    """fusion.json as it grows: entries kept from an earlier file (--merge) unless rerun, this
    run's entries added after every scan, then written with fusion.md."""

    def __init__(self, header: dict, set_info: dict, rerun: set):
        self.path = os.path.join(FLAGS.results_dir, "fusion.json")
        self.payload = {**header, "sets": {}, "set_info": {}}
        earlier = harness.read_json(self.path, FLAGS.merge)
        for s, entries in earlier.get("sets", {}).items():
            kept = {n: e for n, e in entries.items() if (s, n) not in rerun}
            if kept:
                self.payload["sets"][s] = kept
                self.payload["set_info"][s] = earlier.get("set_info", {}).get(s)
        self.payload["set_info"].update(set_info)
        self.records = {}  # (set, configuration): this run's per-scan records

    def add(self, case, name: str, entry: dict, result: dict, total: int, load: list) -> None:
        """One more scan of configuration ``name`` (``total`` scans in its set; ``load``: the
        load average at its start): its figures from every scan so far; fusion.json, .md."""
        records = self.records.setdefault((case.set_name, name), [])
        records.append(harness.score(case, result, name))
        figures = harness.dice_figures(records)
        stages = dict.fromkeys(k for r in records for k in r["stages"])
        figures.update(subjects=list(figures["per_subject"]), complete=len(records) == total,
                       stage_seconds_per_scan={k: float(np.mean([r["stages"].get(k, 0.0)
                                                                 for r in records]))
                                               for k in stages})
        if records[0]["folding_fractions"] is not None:
            figures["per_subject_atlas_folding"] = {r["subject"]: r["folding_fractions"]
                                                    for r in records}
        self.payload["sets"].setdefault(case.set_name, {})[name] = {
            **entry, "command": self.payload["command"], "git_commit": self.payload["git_commit"],
            "load_average_1_5_15min": {"start": load, "end": os.getloadavg()}, **figures}
        self.write()

    def write(self) -> None:
        harness.write_results(self.payload, markdown, os.path.join(FLAGS.results_dir, "fusion"))


def evaluate_product(name: str, config: dict, cases: list, results: Results) -> None:
    load = os.getloadavg()  # the machine is shared: how busy it was
    pairs, fusion = atlas_pairs()[:config["count"]], config["fusion"] or PRODUCT_FUSION
    segmenter = harness.Product(FLAGS.model_dir, config["refinement"], fusion=fusion, atlases=(
        pairs[1:] or None) if FLAGS.model_dir else pairs)  # a run's atlas is the primary one
    print(f"=== {name}: {segmenter.description}; loaded in {segmenter.load_seconds:.1f} s",
          flush=True)
    entry = {"kind": "product", "method": segmenter.description,
             "start": "G_F of RUN" if FLAGS.model_dir else "identity",
             "atlases": [{"name": a["name"], "image": _portable(a["image"]),
                          "labels": _portable(a["labels"])}
                         for a in segmenter.predictor.atlases.records()],
             "fusion": config["fusion"], "model_load_s": segmenter.load_seconds,
             "refinement": segmenter.predictor.refinement_record()}
    for case in cases:
        result = segmenter.segment(case.image_path, case.output(FLAGS.work_dir, name))
        results.add(case, name, entry, result, sum(c.set_name == case.set_name for c in cases),
                    load)
    del segmenter
    gc.collect()


def evaluate_ants(names: list, cases: list, results: Results) -> None:
    """Every ANTs configuration in ``names`` from one registration of each atlas per scan."""
    load = os.getloadavg()
    rules = {n: (parse_config(n)["fusion"], parse_config(n)["count"]) for n in names}
    pairs = atlas_pairs()[:max(count for _, count in rules.values())]
    segmenter = anchors.AntsAtlases([p for p, _ in pairs], [p for _, p in pairs], rules,
                                    spacing=FLAGS.ants_spacing,
                                    search_radius=FLAGS.ants_search_radius,
                                    histogram_match=FLAGS.ants_histogram_match)
    print(f"=== {', '.join(names)}: {len(pairs)} atlases registered once per scan, on "
          f"{', '.join(c.subject for c in cases)}", flush=True)
    subjects = {s: [c.subject for c in cases if c.set_name == s]
                for s in dict.fromkeys(c.set_name for c in cases)}
    settings = {"subjects": subjects, "spacing_mm": FLAGS.ants_spacing,
                "search_radius": FLAGS.ants_search_radius,
                "histogram_match": FLAGS.ants_histogram_match,
                "intensity_scale": segmenter.intensity_scale, "registrations_shared_by": names,
                "seconds_counted": ANTS_SECONDS}
    for case in cases:
        found = segmenter.segment_all(case.image_path,
                                      {n: case.output(FLAGS.work_dir, n) for n in names})
        for name, (rule, count) in rules.items():
            results.add(case, name, {
                "kind": "ants", "method": segmenter.descriptions[name],
                "start": "ANTs affine stage", "fusion": None if rule == "syn" else rule,
                "atlases": [{"name": volumes.scan_name(p), "image": _portable(p),
                             "labels": _portable(q)} for p, q in pairs[:count]],
                "model_load_s": segmenter.load_seconds, "ants": settings},
                found[name], len(subjects[case.set_name]), load)
    del segmenter
    gc.collect()


# ------------------------------------------------------------------------------- fusion.md
def _mean_over(entry: dict, key: str, subjects: list):
    values = entry[key]
    if not subjects or any(s not in values for s in subjects):
        return None
    return float(np.mean([values[s] for s in subjects]))


def markdown(results: dict) -> list:
    lines = ["# Multi-atlas segmentation: the product with several atlases, against ANTs", "",
             f"Last run: `{results['command']}`, commit `{results['git_commit'][:12]}`; "
             f"{results['machine']}.", "",
             "Mean Dice over the 28 structures of Table 1 on the atlas grid at full resolution. "
             "A configuration of N atlases uses the primary atlas and the first N - 1 extra "
             "ones (listed per configuration below). Seconds per scan: one scan end to end "
             "(read the NIfTI, register, refine, fuse, write the segmentation), mean over the "
             "scans it ran on; load: reading the atlases and the model, and the first call's "
             "graph tracing, paid once per process. The machine is shared (2 cores): load "
             "averages during each configuration are in fusion.json.", ""]
    for set_name, entries in results["sets"].items():
        lines += _set_section(set_name, entries, results.get("set_info", {}).get(set_name) or {})
    ants = [(n, s, e) for s, entries in results["sets"].items() for n, e in entries.items()
            if e["kind"] == "ants"]
    if ants:
        lines += ["## ANTs: exactly what ran", "", f"Seconds are {ANTS_SECONDS}", "", *table(
            ["config", "subjects", "registration grid", "JLF search radius", "intensities x",
             "registrations shared by"],
            [[n, f"{s}: {', '.join(e['subjects'])}", f"{e['ants']['spacing_mm']:g} mm"
              if e["ants"]["spacing_mm"] else "full (1 mm)",
              e["ants"]["search_radius"] if e["fusion"] == "jlf" else "–",
              f"{e['ants']['intensity_scale']:g}", ", ".join(e["ants"]["registrations_shared_by"])]
             for n, s, e in sorted(ants, key=lambda a: [x[0] for x in ants].index(a[0]))]), ""]
    methods = {}
    for set_name, entries in results["sets"].items():
        for name, e in entries.items():
            methods.setdefault((name, e["method"], ", ".join(a["name"] for a in e["atlases"]),
                                f"`{e['command']}`", f"`{e['git_commit'][:12]}`"),
                               []).append(set_name)
    if methods:
        lines += ["## Configurations", "", *table(
            ["config", "sets", "method", "atlases", "command", "commit"],
            [[k[0], ", ".join(v), *k[1:]] for k, v in methods.items()]), ""]
    return lines


def _set_section(set_name: str, entries: dict, info: dict) -> list:
    subjects = info.get("subjects") or sorted({s for e in entries.values() for s in e["subjects"]})
    jlf = [(int(n.rsplit("_", 1)[1]), n) for n in entries if n.startswith("ants_jlf_")]
    jlf_name = max(jlf)[1] if jlf else None
    reference = entries.get(jlf_name)
    ants_subjects = reference["subjects"] if reference else []
    subset, one_shot = bool(reference) and ants_subjects != subjects, entries.get(ONE_SHOT)
    rows = []
    for name, e in entries.items():
        common = [s for s in e["subjects"] if reference and s in reference["per_subject_seconds"]]
        ours = _mean_over(e, "per_subject_seconds", common)
        theirs = _mean_over(reference, "per_subject_seconds", common) if reference else None
        base = one_shot and _mean_over(one_shot, "per_subject", e["subjects"])
        rows.append([name, e["start"], len(e["atlases"]), e["fusion"] or "–",
                     f"**{e['mean_dice']:.3f}**" + ("" if e["complete"] else
                                                    f" (partial: {len(e['subjects'])} scans)"),
                     *([cell(_mean_over(e, "per_subject", ants_subjects), ".3f")] if subset
                       else []), f"{e['seconds_per_scan']:.1f}",
                     cell(None if ours is None or not theirs else ours / theirs, ".4f"),
                     cell(None if base is None else e["mean_dice"] - base, "+.3f"),
                     f"{e['model_load_s']:.1f}"])
    reference_name = jlf_name or "ANTs JLF"
    lines = [f"## {set_name}: {', '.join(subjects)}", "", info.get("note", ""), "", *table(
        ["config", "start", "atlases", "fusion", "Dice",
         *([f"Dice on {', '.join(ants_subjects)}"] if subset else []), "s/scan",
         f"seconds / {reference_name}'s", f"Dice − {ONE_SHOT}", "load s"], rows),
        "", f"Seconds / {reference_name}'s: mean seconds per scan over the subjects both ran "
        f"({', '.join(ants_subjects) or 'none'}). Dice − {ONE_SHOT}: over the configuration's "
        f"own subjects.", "", "Per subject (Dice / seconds):", "",
        *harness.per_subject(entries, subjects), ""]
    stages = list(dict.fromkeys(k for e in entries.values()
                                for k in e.get("stage_seconds_per_scan", {})))
    lines += ["Seconds per scan by stage (the product: align, network, refine, labels = fusion "
              "weights and the labels pulled onto the scan; ANTs: as counted below):", "", *table(
                  ["config", *stages, "folding", "load average"],
                  [[n, *(cell(e.get("stage_seconds_per_scan", {}).get(k), ".1f") for k in stages),
                    f"{100 * e['folding_fraction']:.3f}%",
                    (lambda load: f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}" if load
                     else "–")(e.get("load_average_1_5_15min"))] for n, e in entries.items()]),
              "", "Folding: brain voxels where the Jacobian determinant of the primary atlas's "
              "deformation is <= 0 (ANTs: mean over its atlases). Load average: the machine's "
              "1-minute load at the configuration's start and end (other users' jobs slow every "
              "method; 2 cores).", "", "Per structure (Dice):", "",
              *harness.per_structure(entries), ""]
    return lines


def main(argv):
    del argv
    unknown = (set(FLAGS.sets) - set(SETS)) | (set(FLAGS.parts) - {"dice"})
    if unknown:
        raise SystemExit(f"unknown sets or parts: {', '.join(sorted(unknown))}")
    atlas_pairs()
    configs = {name: parse_config(name) for name in FLAGS.configs}
    header = {"command": _portable(harness.command_line()), "git_commit": harness.git_commit(),
              "machine": harness.machine_line()}
    cases, set_info, ants = [], {}, []
    if "dice" in FLAGS.parts:
        cases, set_info = harness.validation_sets(FLAGS.data_dir, FLAGS.work_dir, FLAGS.sets,
                                                  _wanted(FLAGS.subjects))
        _wanted(FLAGS.subjects, cases)
        wanted = _wanted(FLAGS.ants_subjects, cases)
        ants = [c for c in cases if wanted is None or c.subject in wanted]
    ants_names = [n for n, c in configs.items() if c["kind"] == "ants"] if ants else []
    rerun = {(c.set_name, n) for n, config in configs.items() if config["kind"] == "product"
             for c in cases} | {(c.set_name, n) for n in ants_names for c in ants}
    results = Results(header, set_info, rerun)
    for name, config in configs.items():
        if config["kind"] == "product" and cases:
            evaluate_product(name, config, cases, results)
        elif ants_names and name == ants_names[0]:
            evaluate_ants(ants_names, ants, results)
    results.write()


if __name__ == "__main__":
    app.run(main)
