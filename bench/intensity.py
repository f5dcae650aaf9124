"""What the per-scan intensity model adds to the label transfer, measured on real brains: each
configuration with and without it, on the same registrations' inputs, one scan after the other
(pairs in alternating order, so a slower moment of the machine weighs on both):

    transfer_1     predict.py --atlas with one atlas, --intensity_model off
    intensity_1    the same with --intensity_model auto (the default)
    jlf_5          five atlases (the data's atlas and sub-01..04), joint label fusion, model off
    intensity_5    the same with the model (its prior: the atlases' votes with their JLF weights)

on sub-06/07 (FreeSurfer labels, on the atlas grid), the six MICCAI 2012 validation subjects
(manual labels, aligned once by ``harness.validation_sets``) and the native FreeSurfer volumes of
sub-06/07 (256³ on their own grids: aligned in the run, labels written there). Dice of the 28
structures of Table 1; seconds per scan end to end (read, segment, write).

    python -m bench.intensity                       # everything (about 10 min on 2 cores)
    python -m bench.intensity --atlas_counts 1 --sets shared

``--variants``: other settings of the model (``IntensityModelSettings`` fields), which is how its
defaults were chosen: with one atlas on transfer_1's labels (the registration is not repeated),
with five (a name ending in ``_5``) as a whole product of its own, e.g.
``--variants beta2=prior_weight:2,per_structure=variance:per_structure`` or
``--variants beta3_5=prior_weight_per_atlas:0.375``.

Writes bench/results/intensity.json and intensity.md (the targets checked at the end).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import gc
import os

import numpy as np
from absl import app, flags

from bench import harness
from bench.harness import cell, table
from ltnet_tf.config import RefinementSettings

SETS = ("shared", "miccai2012", "native")
PAIRS = {"1": ("transfer_1", "intensity_1"), "5": ("jlf_5", "intensity_5")}
TARGETS = {"intensity_1": ("transfer_1", 0.03), "intensity_5": ("jlf_5", 0.01)}
MAX_STRUCTURE_LOSS, MAX_TIME_RATIO = 0.01, 1.3

harness.define_flags("intensity")
flags.DEFINE_list("sets", list(SETS), "Validation sets.")
flags.DEFINE_list("atlas_counts", list(PAIRS), "1 and/or 5 atlases.")
flags.DEFINE_list("extra_atlases", ["sub-01", "sub-02", "sub-03", "sub-04"],
                  "Subjects used as atlases after the primary one, in order.")
flags.DEFINE_list("variants", [], "name=field:value[;field:value]: the intensity model with other "
                  "settings on transfer_1's labels (one atlas).")
FLAGS = flags.FLAGS


def native_cases(data_dir: str) -> list:
    return [harness.Case("native", s, os.path.join(data_dir, "native", "images", f"{s}.mgz"),
                         os.path.join(data_dir, "native", "labels", f"{s}.mgz"))
            for s in harness.SHARED_SUBJECTS]


def run_pair(count: str, cases: list, results: dict) -> None:
    """Both configurations of ``count`` atlases on every case, scan by scan."""
    pairs = harness.atlas_pairs(FLAGS.data_dir, FLAGS.extra_atlases)[:int(count)]
    names = PAIRS[count]
    products = {name: harness.Product(None, RefinementSettings(), atlases=pairs,
                                      intensity_model="off" if index == 0 else "auto")
                for index, name in enumerate(names)}
    variants = parse_variants(FLAGS.variants, five=count == "5")
    if count == "5":  # whole products: the registrations of five atlases are not kept
        products.update({name: harness.Product(None, RefinementSettings(), atlases=pairs,
                                               intensity_model=model.settings)
                         for name, model in variants.items()})
        names, variants = (*names, *variants), {}
    records = {name: {} for name in (*names, *variants)}
    for number, case in enumerate(cases):
        order = names if number % 2 == 0 else names[::-1]  # pairs alternate
        for name in order:
            result = products[name].segment(case.image_path, case.output(FLAGS.work_dir, name))
            record = harness.score(case, result, name)
            record["intensity_model"] = result.get("intensity_model")
            records[name].setdefault(case.set_name, []).append(record)
            if name == names[0]:
                for variant, model in variants.items():
                    found = finish(model, case, result["segmentation"])
                    records[variant].setdefault(case.set_name, []).append(
                        harness.score(case, found, variant))
    for name in records:
        for set_name, found in records[name].items():
            figures = harness.dice_figures(found,
                                           folding=found[0]["folding_fraction"] is not None)
            figures["intensity_model"] = {r["subject"]: r.get("intensity_model") for r in found}
            figures["stage_seconds_per_scan"] = {
                stage: float(np.mean([r["stages"].get(stage, 0.0) for r in found]))
                for stage in dict.fromkeys(k for r in found for k in r["stages"])}
            results["sets"].setdefault(set_name, {})[name] = {
                "method": products[name].description if name in products else (
                    f"transfer_1's labels finished by the model with {variants[name].settings}"),
                "atlases": [os.path.basename(p) for p, _ in pairs],
                "model_load_s": products[name].load_seconds if name in products else 0.0,
                **figures}
    del products
    gc.collect()


def parse_variants(values, five: bool) -> dict:
    """{name: IntensityModel} of ``--variants`` (name=field:value;field:value) for one atlas, or
    with ``five`` those whose name ends in _5."""
    from ltnet_tf.labelling.intensity_model import IntensityModel, IntensityModelSettings

    found, defaults = {}, IntensityModelSettings()
    for item in values:
        name, _, changes = item.partition("=")
        if name.endswith("_5") != five:
            continue
        fields = dict(change.split(":", 1) for change in changes.split(";") if change)
        found[name] = IntensityModel(defaults.replace(**{
            k: v if isinstance(getattr(defaults, k), str) else type(getattr(defaults, k))(
                float(v)) for k, v in fields.items()}))
    return found


def finish(model, case, labels) -> dict:
    """transfer_1's labels of ``case`` finished by ``model`` (timed: the model alone)."""
    import time

    from ltnet_tf.io import intensity, volumes
    from ltnet_tf.io.headers import voxel_sizes
    from ltnet_tf.registration.native import brain_mask

    scan = volumes.load_scan(case.image_path)
    start = time.time()
    result = model(intensity.normalize_array(scan.data), brain_mask(scan.data), labels,
                   voxel_sizes(scan.affine))
    return {"segmentation": result.labels, "seconds": time.time() - start,
            "stage_seconds": {"intensity_model": time.time() - start}}


def checks(results: dict) -> list:
    """[(set, check, value, target, met)] of the targets on every set that has both sides."""
    found = []
    for set_name, entries in results["sets"].items():
        for name, (base, gain) in TARGETS.items():
            if name not in entries or base not in entries:
                continue
            ours, theirs = entries[name], entries[base]
            difference = ours["mean_dice"] - theirs["mean_dice"]
            worst = min(ours["per_structure"][k] - theirs["per_structure"][k]
                        for k in ours["per_structure"])
            ratio = ours["seconds_per_scan"] / theirs["seconds_per_scan"]
            found += [(set_name, f"{name} − {base} (mean Dice)", difference, f">= +{gain}",
                       difference >= gain),
                      (set_name, f"{name}: worst structure − {base}'s", worst,
                       f">= −{MAX_STRUCTURE_LOSS}", worst >= -MAX_STRUCTURE_LOSS),
                      (set_name, f"{name} seconds / {base}'s", ratio, f"<= {MAX_TIME_RATIO}",
                       ratio <= MAX_TIME_RATIO)]
    return found


def markdown(results: dict) -> list:
    lines = ["# The per-scan intensity model on the label transfer's prior", "",
             f"Command: `{results['command']}`, commit `{results['git_commit'][:12]}`; "
             f"{results['machine']}; load average at the start {results['load_start'][0]:.1f}, "
             f"at the end {results['load_end'][0]:.1f}.", "",
             "Dice: the 28 structures of Table 1. Seconds per scan: end to end (read, align when "
             "native, register, pull the labels, finish them, write), the two configurations of "
             "a pair run scan by scan in alternating order in one process.", ""]
    for set_name, entries in results["sets"].items():
        rows = []
        for name, e in entries.items():
            base = (None if name in ("transfer_1", "jlf_5") else TARGETS.get(
                name, ("jlf_5" if name.endswith("_5") else "transfer_1",))[0])
            known = base in entries
            rows.append([name, f"**{e['mean_dice']:.3f}**",
                         cell(e["mean_dice"] - entries[base]["mean_dice"] if known else None,
                              "+.3f"), f"{e['seconds_per_scan']:.2f}",
                         cell(e["seconds_per_scan"] / entries[base]["seconds_per_scan"]
                              if known else None, ".2f"), e["method"]])
        lines += [f"## {set_name}: {', '.join(next(iter(entries.values()))['per_subject'])}", "",
                  *table(["config", "Dice", "− without the model", "s/scan", "time ratio",
                          "method"], rows), "", "Per subject (Dice / seconds):", "",
                  *harness.per_subject(entries, next(iter(entries.values()))["per_subject"]),
                  "", "Per structure:", "", *harness.per_structure(entries), ""]
    lines += ["## Targets", "", *table(["set", "check", "value", "target", "met"], [
        [s, c, f"{v:+.4f}" if "Dice" in c or "worst" in c else f"{v:.3f}", t,
         "yes" if m else "**no**"] for s, c, v, t, m in checks(results)]), ""]
    return lines


def main(argv):
    del argv
    unknown = (set(FLAGS.sets) - set(SETS)) | (set(FLAGS.atlas_counts) - set(PAIRS))
    if unknown:
        raise SystemExit(f"unknown sets or atlas counts: {', '.join(sorted(unknown))}")
    cases, set_info = harness.validation_sets(FLAGS.data_dir, FLAGS.work_dir,
                                              [s for s in FLAGS.sets if s != "native"])
    if "native" in FLAGS.sets:
        cases += native_cases(FLAGS.data_dir)
        set_info["native"] = {"subjects": list(harness.SHARED_SUBJECTS),
                              "note": "FreeSurfer's native 256³ volumes, segmented on their grids"}
    results = {"command": harness.command_line({FLAGS.work_dir: "WORK"}),
               "git_commit": harness.git_commit(), "machine": harness.machine_line(),
               "load_start": os.getloadavg(), "set_info": set_info, "sets": {}}
    for count in FLAGS.atlas_counts:
        run_pair(count, cases, results)
    results["load_end"] = os.getloadavg()
    results["targets"] = [{"set": s, "check": c, "value": v, "target": t, "met": m}
                          for s, c, v, t, m in checks(results)]
    harness.write_results(results, markdown, os.path.join(FLAGS.results_dir, "intensity"))


if __name__ == "__main__":
    app.run(main)
