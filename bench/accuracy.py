"""Accuracy and time per scan on real brains: label transfer with and without a trained network,
against ANTs SyN, in one run.

The atlas of ../shared/data is the one labelled scan. Trained configurations use the README's CPU
recipe (``train.py --profile cpu``) on 17 unlabelled scans (sub-01..05 and MICCAI 2012 1009-1125;
their labels are never read), validated on sub-06/07. Every configuration segments the same
validation scans and is scored with Dice on the 28 structures of the paper's Table 1, on the atlas
grid at full resolution:

    shared       sub-06, sub-07 of ../shared/data (FreeSurfer aseg labels, aligned to the atlas)
    miccai2012   MICCAI 2012 1000-1008 (manual labels of another protocol: they compare methods,
                 not absolute accuracy), each aligned affinely to the atlas once by
                 ltnet_tf.registration.alignment and cached, so every method reads the same input

Configurations (``bench/anchors.py`` holds the segmenters; the product's go through
``ltnet_tf.prediction.predictor.Predictor``, exactly as predict.py):

    affine                    the atlas labels as they are (no registration): the floor
    ants_syn, ants_syn_half   ANTs SyN with antspyx's defaults, on the full grid / on 2 mm grids
    ltnet, voxelmorph, ...    a trained run folder's G_F alone (``--model_dirs``, else trained here)
    <preset>_refined          the same G_F plus predict.py's default refinement
    identity_refined          no network: predict.py's default refinement from the identity
    <start>_c<N>[_f<M>]       a refinement budget from either start (a preset or ``identity``):
                              N steps on the coarse grid (the network's working grid, 1/4), then
                              M at half resolution; ``identity_c0_f0`` times the fixed cost

Each records Dice (per set, subject and structure), seconds per scan (one scan end to end on this
machine: read, normalise, register, refine, pull the labels, write; loading the model or atlas and
the first call's tracing are timed separately), the refinement's own seconds, and the folding
fraction (brain voxels with Jacobian determinant <= 0).

    python -m bench.accuracy --configs affine,ants_syn_half --sets shared      # a quick look
    python -m bench.accuracy --model_dirs ltnet=RUN                            # the frontier

Writes bench/results/accuracy.json, accuracy.md, accuracy_frontier.png (Dice against seconds per
scan, with the budget curves of both starts), accuracy_structures.png and accuracy_curve.png.
"""
from __future__ import annotations

import os

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, command_line, git_commit, portable, write_json

import gc
import json
import re
import platform
import shutil
import time

import numpy as np
from absl import app, flags

from bench import anchors
from ltnet_tf.commands import cli
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = ("voxelmorph", "voxelmorph_gan", "voxelmorph_cycle", "ltnet")
STARTS = ["identity", *TRAINED]  # and the names given to --model_dirs (main)
FIXED = ("affine", "ants_syn_half", "ants_syn")
BUDGET = re.compile(r"^(?P<start>[a-z_]+?)_c(?P<coarse>\d+)(?:_f(?P<fine>\d+))?$")
SETS = ("shared", "miccai2012")
# Refinement budgets swept for both starts: (coarse steps, fine steps).
SWEEP = ((10, 0), (25, 0), (25, 10), (50, 25), (100, 25))
COARSE_FACTOR = 4  # the budgets' coarse grid: the CPU recipe's working grid
FRONTIER = ("affine", "ants_syn_half", "ants_syn", "ltnet", "ltnet_refined", "identity_refined",
            "identity_c0_f0",
            *(f"{start}_c{c}_f{f}" for start in ("ltnet", "identity") for c, f in SWEEP))

flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "accuracy"),
                    "Run folders trained here, aligned MICCAI scans, segmentations.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("configs", list(FRONTIER), "Configurations to run, in this order (see the "
                  "module docstring).")
flags.DEFINE_list("sets", list(SETS), "Validation sets; the first one gives the headline figures.")
flags.DEFINE_list("miccai_subjects", list(anchors.MICCAI_SUBJECTS),
                  "MICCAI 2012 subjects to validate on (never ones used for training).")
flags.DEFINE_list("model_dirs", [], "Trained run folders to evaluate instead of training, as "
                  "name=path (e.g. ltnet=RUN1,vxm_half=RUN2): a preset's name, or any name for "
                  "another run; <name>_refined and <name>_c<N>_f<M> use <name>'s folder.")
flags.DEFINE_string("training_results", None, "accuracy.json of the bench run that trained the "
                    "--model_dirs folders: their training time and command are copied from it.")
flags.DEFINE_list("train_flags", [], "Extra train.py flags for every configuration trained "
                  "here, after --profile cpu (e.g. steps=600).")
flags.DEFINE_bool("merge", True, "Keep the configurations of an existing accuracy.json that are "
                  "not rerun (each entry records its own command and commit).")
FLAGS = flags.FLAGS

TRAIN_SUBJECTS = ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05")
# MICCAI 2012 subjects used as unlabelled training scans (the others validate).
MICCAI_TRAIN = ("1009", "1010", "1011", "1012", "1013", "1014", "1015", "1017", "1107", "1113",
                "1119", "1125")
VAL_SUBJECTS = anchors.SHARED_SUBJECTS


def _paths(kind, subjects):
    return ",".join(os.path.join(FLAGS.data_dir, kind, f"{s}.nii.gz") for s in subjects)


def unlabeled_scans() -> str:
    """The recipe's 17 unlabelled training scans (comma-separated)."""
    miccai = ",".join(os.path.join(FLAGS.data_dir, "miccai2012", "images", f"{s}.nii.gz")
                      for s in MICCAI_TRAIN)
    return f"{_paths('images', TRAIN_SUBJECTS)},{miccai}"


def parse_config(name: str) -> dict:
    """{'kind': fixed|network|refined|budget, 'start': preset or 'identity', 'refinement':
    RefinementSettings or None}; SystemExit for an unknown name."""
    defaults = RefinementSettings()
    if name in FIXED:
        return {"kind": "fixed", "start": None, "refinement": None}
    if name in STARTS and name != "identity":
        return {"kind": "network", "start": name, "refinement": None}
    if name.endswith("_refined") and name[:-len("_refined")] in STARTS:
        return {"kind": "refined", "start": name[:-len("_refined")], "refinement": defaults}
    budget = BUDGET.match(name)
    if budget and budget["start"] in STARTS:
        # Budgets put their coarse steps on the quarter grid whatever the network's own grid,
        # so that every start spends them alike.
        return {"kind": "budget", "start": budget["start"], "refinement": defaults.replace(
            coarse_steps=int(budget["coarse"]), steps=int(budget["fine"] or 0),
            coarse_factor=COARSE_FACTOR)}
    raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(FIXED)}, a preset "
                     f"({', '.join(TRAINED)}), <start>_refined or <start>_c<N>[_f<M>] with "
                     f"start in {', '.join(STARTS)}")


def _summarise(cases: list) -> dict:
    """Figures of one configuration on one set, from its per-scan records."""
    subjects = {c["subject"]: evaluation.mean_dice(c["dice"], BENCHMARK_LABELS) for c in cases}
    structures = {}
    for label in BENCHMARK_LABELS:
        values = [c["dice"][label] for c in cases]
        structures[structure_name(label)] = float(np.nanmean(values))
    return {"mean_dice": float(np.mean(list(subjects.values()))), "per_subject": subjects,
            "per_structure": structures,
            "seconds_per_scan": float(np.mean([c["seconds"] for c in cases])),
            "per_subject_seconds": {c["subject"]: c["seconds"] for c in cases},
            "folding_fraction": float(np.mean([c["folding_fraction"] for c in cases])),
            "per_subject_folding": {c["subject"]: c["folding_fraction"] for c in cases},
            **({"per_subject_refinement_loss": {c["subject"]: c["refinement_loss"] for c in cases}}
               if cases[0].get("refinement_loss") else {})}


# ------------------------------------------------------------------------------- trained runs
def train(name: str) -> str:
    """Train one preset with the README's CPU recipe; -> its run folder."""
    model_dir = os.path.join(FLAGS.work_dir, name)
    shutil.rmtree(model_dir, ignore_errors=True)
    argv = ["train", "--profile", "cpu", "--preset", name,
            "--atlas", os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
            "--atlas_labels", os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"),
            "--unlabeled", unlabeled_scans(), "--model_dir", model_dir,
            "--val_images", _paths("images", VAL_SUBJECTS),
            "--val_labels", _paths("labels", VAL_SUBJECTS),
            *[f"--{e}" for e in FLAGS.train_flags]]
    start = time.time()
    if cli.train_main(argv) != 0:
        raise SystemExit(f"training {name} failed")
    with open(os.path.join(model_dir, "training_time.json"), "w") as f:
        json.dump({"train_time_s": time.time() - start,
                   "command": command_line(), "git_commit": git_commit()}, f)
    return model_dir


def run_record(name: str, model_dir: str) -> tuple:
    """What a run folder is: its config essentials, validation curve and training time (from the
    folder when trained here, else from --training_results when that run is recorded there)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    curve = []
    if os.path.isfile(os.path.join(model_dir, "validation.json")):
        with open(os.path.join(model_dir, "validation.json")) as f:
            curve = [{"step": r["step"], "val_dice": r["val_dice"]} for r in json.load(f)]
    record = {"model_dir": portable(os.path.abspath(model_dir)), "preset": name,
              "steps": config["steps"],
              "downsample": config["downsample"],
              "working_grid": "x".join(str(s // config["downsample"])
                                       for s in config["atlas_shape"]),
              "unet": [config["enc_features"], config["dec_features"]],
              "loss_weights": {k: v for k, v in config.items() if k.startswith("weight_")},
              "optimisation": {k: config[k] for k in ("g_learning_rate", "d_learning_rate",
                                                      "cycle_warmup_steps", "batch_size")},
              "train_time_s": None, "training_source": None}
    trained_here = os.path.join(model_dir, "training_time.json")
    if os.path.isfile(trained_here):
        with open(trained_here) as f:
            timing = json.load(f)
        record.update(train_time_s=timing["train_time_s"],
                      training_source={"command": timing["command"],
                                       "git_commit": timing["git_commit"]})
    elif FLAGS.training_results and os.path.isfile(FLAGS.training_results):
        with open(FLAGS.training_results) as f:
            trained = json.load(f).get("configs", {}).get(name)
        if trained and "train_time_s" in trained:
            record.update(train_time_s=trained["train_time_s"],
                          training_source={"results": os.path.abspath(FLAGS.training_results),
                                           "command": trained.get("command"),
                                           "git_commit": trained.get("git_commit")})
    return record, curve


# ------------------------------------------------------------------------------- evaluation
def make_segmenter(name: str, model_dirs: dict):
    atlas = os.path.join(FLAGS.data_dir, "atlas.nii.gz")
    atlas_labels = os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")
    if name == "affine":
        return anchors.AtlasLabels(atlas_labels)
    if name.startswith("ants_syn"):
        return anchors.AntsSyn(atlas, atlas_labels, spacing=2.0 if name.endswith("_half") else None)
    config = parse_config(name)
    if config["start"] == "identity":
        return anchors.Product(None, config["refinement"], atlases=[(atlas, atlas_labels)])
    if config["start"] not in model_dirs:
        model_dirs[config["start"]] = train(config["start"])
    return anchors.Product(model_dirs[config["start"]], config["refinement"])


def evaluate(name: str, cases: list, model_dirs: dict) -> dict:
    load_average = {"start": os.getloadavg()}  # the machine is shared: how busy it was
    segmenter = make_segmenter(name, model_dirs)
    print(f"=== {name}: {segmenter.description}; loaded in {segmenter.load_seconds:.1f} s",
          flush=True)
    records = []
    for number, case in enumerate(cases, start=1):
        output = os.path.join(FLAGS.work_dir, "segmentations", name, case.set_name,
                              f"{case.subject}_seg.nii.gz")
        result = segmenter.segment(case.image_path, output)
        reference = data.load_label_map(case.label_path).data
        dice = evaluation.dice_per_label(result["segmentation"], reference, BENCHMARK_LABELS)
        records.append({"set": case.set_name, "subject": case.subject, "dice": dice,
                        "seconds": result["seconds"],
                        "refine_seconds": result.get("stage_seconds", {}).get("refine"),
                        "folding_fraction": result["folding_fraction"],
                        "refinement_loss": result.get("refinement_loss")})
        print(f"[{name} {number}/{len(cases)}] {case.set_name} {case.subject}: Dice "
              f"{evaluation.mean_dice(dice, BENCHMARK_LABELS):.3f}, {result['seconds']:.1f} s, "
              f"folding {100 * result['folding_fraction']:.4f}%", flush=True)
    sets = {s: _summarise([r for r in records if r["set"] == s])
            for s in dict.fromkeys(r["set"] for r in records)}
    primary = next(iter(sets))
    result = {"method": segmenter.description, **{k: sets[primary][k] for k in (
                  "mean_dice", "per_subject", "per_structure", "seconds_per_scan",
                  "folding_fraction")},
              "figures_from_set": primary, "sets": sets,
              "seconds_per_scan_all_sets": float(np.mean([r["seconds"] for r in records])),
              "model_load_s": segmenter.load_seconds, "curve": [],
              "load_average_1_5_15min": {**load_average, "end": os.getloadavg()}}
    if isinstance(segmenter, anchors.Product):
        start = parse_config(name)["start"]
        if start != "identity":
            result["run"], result["curve"] = run_record(start, model_dirs[start])
            result["run"]["checkpoint"] = portable(segmenter.checkpoint)
        result["refinement"] = segmenter.predictor.refinement_record()
        refine = [r["refine_seconds"] for r in records if r["refine_seconds"] is not None]
        result["refine_seconds_per_scan"] = float(np.mean(refine)) if refine else None
    del segmenter
    gc.collect()
    return result


# ------------------------------------------------------------------------------- outputs
def _set_title(results: dict, set_name: str) -> str:
    return f"{set_name} ({len(results['sets'][set_name]['subjects'])})"


def write_outputs(results: dict) -> None:
    write_json(results, os.path.join(FLAGS.results_dir, "accuracy.json"))
    with open(os.path.join(FLAGS.results_dir, "accuracy.md"), "w") as f:
        f.write("\n".join(_markdown(results)) + "\n")
    _plots(results)


def _markdown(results: dict) -> list:
    configs = results["configs"]
    sets = [s for s in results["sets"] if any(s in r["sets"] for r in configs.values())]
    lines = ["# Accuracy and time per scan: one-shot label transfer vs ANTs SyN", "",
             f"Machine: {results['machine']}", "",
             "Mean Dice over the 28 structures of Table 1 on the atlas grid at full resolution. "
             "Seconds per scan: one scan end to end (read the NIfTI, normalise, register, "
             "refine, warp the labels, write), mean over the set's scans; loading the model or "
             "atlas (and TensorFlow's first-call graph optimisation) is the load column. Folding: "
             "brain voxels (the scan's non-zero voxels) where the Jacobian determinant of the "
             "deformation is <= 0.", ""]
    for s in sets:
        info = results["sets"][s]
        lines.append(f"- **{s}**: {', '.join(info['subjects'])}. {info['note']}")
    lines += ["", "| config | " + " | ".join(f"Dice {_set_title(results, s)}" for s in sets)
              + " | s/scan | folding | load | G_F training |",
              "|---|" + "---|" * len(sets) + "---|---|---|---|"]
    for name, r in configs.items():
        dice = " | ".join(f"**{r['sets'][s]['mean_dice']:.3f}**" if s in r["sets"] else "–"
                          for s in sets)
        run = r.get("run")
        training = "" if not run else (
            f"{run['steps']} steps at {run['working_grid']}"
            + (f", {run['train_time_s'] / 60:.0f} min" if run.get("train_time_s") else ""))
        lines.append(f"| {name} | {dice} | {r['seconds_per_scan_all_sets']:.1f} | "
                     f"{100 * np.mean([v['folding_fraction'] for v in r['sets'].values()]):.3f}% "
                     f"| {r['model_load_s']:.1f} s | {training} |")
    lines += ["", "s/scan and folding: over all scans of every set (one grid size); per set in "
              "accuracy.json.", ""]
    lines += _network_vs_identity(configs, sets)
    lines += ["", "Per subject (Dice / seconds):", "",
              "| set | subject | " + " | ".join(configs) + " |",
              "|---|---|" + "---|" * len(configs)]
    for s in sets:
        for subject in results["sets"][s]["subjects"]:
            cells = [f"{r['sets'][s]['per_subject'][subject]:.3f} / "
                     f"{r['sets'][s]['per_subject_seconds'][subject]:.0f} s"
                     if s in r["sets"] else "–" for r in configs.values()]
            lines.append(f"| {s} | {subject} | " + " | ".join(cells) + " |")
    for suffix in ("_refined", ""):
        a, b = f"ltnet{suffix}", f"voxelmorph{suffix}"
        if a in configs and b in configs:
            lines += ["", f"LT-Net minus VoxelMorph per subject ({a} vs {b}):", "",
                      f"| set | subject | {a} | {b} | difference |", "|---|---|---|---|---|"]
            for s in sets:
                if s not in configs[a]["sets"] or s not in configs[b]["sets"]:
                    continue
                for subject in results["sets"][s]["subjects"]:
                    x = configs[a]["sets"][s]["per_subject"][subject]
                    y = configs[b]["sets"][s]["per_subject"][subject]
                    lines.append(f"| {s} | {subject} | {x:.3f} | {y:.3f} | {x - y:+.3f} |")
    lines += ["", "| config | method | command | commit |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['method']} | `{r['command']}` | `{r['git_commit'][:12]}` |"
              for name, r in configs.items()]
    for s in sets:
        shown = {n: r for n, r in configs.items() if s in r["sets"]}
        lines += ["", f"Per structure, {s}:", "", "| structure | " + " | ".join(shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for label in BENCHMARK_LABELS:
            name = structure_name(label)
            lines.append(f"| {name} | " + " | ".join(
                f"{r['sets'][s]['per_structure'][name]:.3f}" for r in shown.values()) + " |")
    return lines


def _network_vs_identity(configs: dict, sets: list) -> list:
    """What the trained network buys: each configuration that starts from G_F against the best
    identity start that takes the same time (within 10%), per set; the refinement's fixed cost."""
    network = {n: r for n, r in configs.items() if parse_config(n)["start"] not in (None,
                                                                                   "identity")}
    identity = {n: r for n, r in configs.items() if parse_config(n)["start"] == "identity"}
    if not network or not identity:
        return []
    lines = ["## What the trained network buys", "",
             "Each configuration starting from G_F against the identity-start configuration of "
             "the highest Dice among those within 10% of its seconds per scan (none: no identity "
             "budget that close).", "",
             "| network config | s/scan | " + " | ".join(f"Dice {s}" for s in sets)
             + " | identity at equal time | s/scan | " + " | ".join(f"Dice {s}" for s in sets)
             + " | " + " | ".join(f"difference {s}" for s in sets) + " |",
             "|---|---|" + "---|" * len(sets) + "---|---|" + "---|" * (2 * len(sets))]
    for name, r in network.items():
        seconds = r["seconds_per_scan_all_sets"]
        close = {n: i for n, i in identity.items()
                 if abs(i["seconds_per_scan_all_sets"] - seconds) <= 0.1 * seconds}
        dice = [r["sets"][s]["mean_dice"] for s in sets]
        row = f"| {name} | {seconds:.2f} | " + " | ".join(f"{d:.3f}" for d in dice)
        if not close:
            lines.append(row + " | none | | " + " | " * (2 * len(sets) - 1) + " |")
            continue
        best = max(close, key=lambda n: np.mean([close[n]["sets"][s]["mean_dice"] for s in sets]))
        other = [close[best]["sets"][s]["mean_dice"] for s in sets]
        lines.append(row + f" | {best} | {close[best]['seconds_per_scan_all_sets']:.2f} | "
                     + " | ".join(f"{d:.3f}" for d in other) + " | "
                     + " | ".join(f"{a - b:+.3f}" for a, b in zip(dice, other)) + " |")
    fixed = configs.get("identity_c0_f0", {}).get("refine_seconds_per_scan")
    if fixed is not None:
        lines += ["", f"Refinement's fixed cost (0 steps, identity start): {fixed:.3f} s per scan "
                  f"(the refine stage alone)."]
        slopes = []
        for name, r in identity.items():
            settings, seconds = r.get("refinement"), r.get("refine_seconds_per_scan")
            if settings and seconds and settings["coarse_steps"] and not settings["steps"]:
                slopes.append(("coarse", (seconds - fixed) / settings["coarse_steps"]))
        for kind, slope in slopes[:1]:
            lines.append(f"Per {kind} step: {slope:.4f} s (from the coarse-only budgets).")
    return lines + [""]


def _plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    figure, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(SETS, ("o", "s", "^", "D")))
    curves = {start: [n for n in configs if parse_config(n)["kind"] in ("refined", "budget")
                      and parse_config(n)["start"] == start] for start in STARTS}
    single = [n for n in configs if parse_config(n)["kind"] in ("fixed", "network")]
    colours = {name: f"C{i}" for i, name in enumerate([*single, *[s for s in STARTS
                                                                   if curves[s]]])}
    for s in dict.fromkeys(s for r in configs.values() for s in r["sets"]):
        for start, names in curves.items():  # a refinement budget curve per start and set
            points = sorted((configs[n]["sets"][s]["seconds_per_scan"],
                             configs[n]["sets"][s]["mean_dice"]) for n in names
                            if s in configs[n]["sets"])
            if points:
                ax.plot(*zip(*points), "-" + markers.get(s, "x"), color=colours[start], ms=6,
                        alpha=0.8)
        for name in single:
            if s in configs[name]["sets"]:
                figures = configs[name]["sets"][s]
                ax.plot(figures["seconds_per_scan"], figures["mean_dice"], markers.get(s, "x"),
                        color=colours[name], ms=9)
    for name in single:
        first = next(iter(configs[name]["sets"].values()))
        ax.annotate(name, (first["seconds_per_scan"], first["mean_dice"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points", color=colours[name])
    for name in single:
        ax.plot([], [], "o", color=colours[name], label=name)
    for start in STARTS:
        if curves[start]:
            label = ("refinement from the identity (no network)" if start == "identity"
                     else f"refinement from {start}'s G_F")
            ax.plot([], [], "-", color=colours[start], label=f"{label}: budgets")
    for s in dict.fromkeys(s for r in configs.values() for s in r["sets"]):
        ax.plot([], [], markers.get(s, "x"), color="gray", label=_set_title(results, s))
    ax.set_xscale("log")
    ax.set_xlabel("seconds per scan (end to end, this machine)")
    ax.set_ylabel("mean Dice (28 structures)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(FLAGS.results_dir, "accuracy_frontier.png"), dpi=100)
    plt.close(figure)

    names = [structure_name(label) for label in BENCHMARK_LABELS]
    figure, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / max(len(configs), 1)
    for i, (config, r) in enumerate(configs.items()):
        ax.bar(np.arange(len(names)) + i * width, [r["per_structure"][n] for n in names], width,
               label=f"{config} ({r['mean_dice']:.3f})")
    ax.set_xticks(np.arange(len(names)) + 0.4)
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.set_ylabel(f"Dice ({next(iter(configs.values()))['figures_from_set']} set)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(FLAGS.results_dir, "accuracy_structures.png"), dpi=90)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(6, 4))
    for config, r in configs.items():
        if r.get("curve") and not config.endswith("_refined"):
            ax.plot([c["step"] for c in r["curve"]], [c["val_dice"] for c in r["curve"]], "o-",
                    label=config)
    if "shared" in configs.get("affine", {}).get("sets", {}):  # validation during training
        ax.axhline(configs["affine"]["sets"]["shared"]["mean_dice"], color="gray", ls="--",
                   label="affine")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation mean Dice (shared set)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(FLAGS.results_dir, "accuracy_curve.png"), dpi=90)
    plt.close(figure)


# ------------------------------------------------------------------------------- main
def validation_cases() -> tuple:
    cases, info = [], {}
    for s in FLAGS.sets:
        if s == "shared":
            cases += anchors.shared_cases(FLAGS.data_dir)
            info[s] = {"subjects": list(VAL_SUBJECTS),
                       "note": "FreeSurfer aseg labels (the atlas's protocol), aligned to the "
                               "atlas by the data's provider."}
        elif s == "miccai2012":
            aligned, manifest = anchors.miccai_cases(
                FLAGS.data_dir, os.path.join(FLAGS.work_dir, "miccai2012_aligned"),
                FLAGS.miccai_subjects)
            cases += aligned
            info[s] = {"subjects": list(FLAGS.miccai_subjects),
                       "note": "Manual Neuromorphometrics labels mapped to FreeSurfer IDs (another "
                               "protocol: compares methods, not absolute accuracy); each scan "
                               "aligned affinely to the atlas once by ltnet_tf.registration.alignment, labels "
                               "by nearest label; every method reads these.",
                       "alignment": manifest}
    return cases, info


def main(argv):
    del argv
    model_dirs = dict(item.split("=", 1) for item in FLAGS.model_dirs)
    STARTS.extend(name for name in model_dirs if name not in STARTS)
    for name in FLAGS.configs:
        parse_config(name)
    unknown = set(FLAGS.sets) - set(SETS)
    if unknown:
        raise SystemExit(f"unknown sets: {', '.join(sorted(unknown))}")
    import tensorflow as tf
    cases, sets = validation_cases()
    results = {"command": command_line(), "git_commit": git_commit(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"TF {tf.__version__}, GPU: {bool(tf.config.list_physical_devices('GPU'))}",
               "train_subjects": TRAIN_SUBJECTS, "val_subjects": VAL_SUBJECTS, "sets": sets,
               "labels": list(BENCHMARK_LABELS), "configs": {}}
    previous = os.path.join(FLAGS.results_dir, "accuracy.json")
    if FLAGS.merge and os.path.isfile(previous):
        with open(previous) as f:
            kept = json.load(f)
        # Only entries measured the same way (per-set figures, timing) can share a table.
        results["configs"] = {name: r for name, r in kept["configs"].items()
                              if name not in FLAGS.configs and "sets" in r}
        results["sets"] = {**kept.get("sets", {}), **sets}
    for name in FLAGS.configs:
        results["configs"][name] = evaluate(name, cases, model_dirs)
        results["configs"][name].update(command=results["command"], git_commit=results["git_commit"])
        r = results["configs"][name]
        print(f"=== {name}: " + ", ".join(f"{s} Dice {v['mean_dice']:.4f} "
                                          f"({v['seconds_per_scan']:.1f} s/scan)"
                                          for s, v in r["sets"].items()), flush=True)
        write_outputs(results)  # after each config, so a long run leaves partial results


if __name__ == "__main__":
    app.run(main)
