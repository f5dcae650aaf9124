"""Accuracy and time per scan on real brains: LT-Net ablation vs ANTs SyN, in one run.

The atlas of ../shared/data is the one labelled scan; sub-01..05 are the unlabelled training scans
(their labels are never read). Every configuration segments the same validation scans and is scored
with Dice on the 28 structures of the paper's Table 1, on the atlas grid at full resolution:

    shared       sub-06, sub-07 of ../shared/data (FreeSurfer aseg labels, aligned to the atlas)
    miccai2012   a subset of ../shared/data/miccai2012 (manual labels of another protocol: they
                 compare methods, not absolute accuracy), each scan aligned affinely to the atlas
                 once by ltnet_tf.alignment and cached, so every method reads the same input

Configurations (``bench/anchors.py`` holds the segmenters):

    affine                    the atlas labels as they are (no registration): the floor
    ants_syn, ants_syn_half   ANTs SyN with antspyx's defaults, on the full grid / on 2 mm grids
    voxelmorph, ..., ltnet    a trained run folder (``--model_dirs``, else trained here as before)
    <trained>_refined         the same G_F plus test-time refinement (ltnet_tf.refinement)

Each records Dice (per set, subject and structure), seconds per scan (one scan end to end on this
machine: read, normalise, register, warp the labels, write; loading the model or atlas is timed
separately) and the folding fraction (brain voxels with Jacobian determinant <= 0).

    python -m bench.accuracy --configs affine,ants_syn_half --sets shared      # a quick look
    python -m bench.accuracy --model_dirs ltnet=RUN1,voxelmorph=RUN2           # the frontier

Writes bench/results/accuracy.json, accuracy.md, accuracy_frontier.png (Dice against seconds per
scan), accuracy_structures.png and accuracy_curve.png.
"""
from __future__ import annotations

import os

from ltnet_tf import compat  # noqa: F401
from bench.provenance import DATA_DIR, command_line, git_commit, write_json

import gc
import json
import platform
import shutil
import time

import numpy as np
from absl import app, flags

from bench import anchors
from ltnet_tf import cli, data, evaluation
from ltnet_tf.labels import BENCHMARK_LABELS, structure_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = ("voxelmorph", "voxelmorph_gan", "voxelmorph_cycle", "ltnet")
CONFIGS = ("affine", "ants_syn_half", "ants_syn", *TRAINED, *(f"{t}_refined" for t in TRAINED))
SETS = ("shared", "miccai2012")
FRONTIER = ("affine", "ants_syn_half", "ants_syn", "voxelmorph", "ltnet", "voxelmorph_refined",
            "ltnet_refined")

flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", "accuracy"),
                    "Run folders trained here, aligned MICCAI scans, segmentations.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("configs", list(FRONTIER), f"Configurations to run, in this order: {CONFIGS}.")
flags.DEFINE_list("sets", list(SETS), "Validation sets; the first one gives the headline figures.")
flags.DEFINE_list("miccai_subjects", list(anchors.MICCAI_SUBJECTS),
                  "MICCAI 2012 subjects to validate on (never ones used for training).")
flags.DEFINE_list("model_dirs", [], "Trained run folders to evaluate instead of training, as "
                  "name=path (e.g. ltnet=/runs/ltnet,voxelmorph=/runs/vxm); <name>_refined uses "
                  "<name>'s folder.")
flags.DEFINE_string("training_results", None, "accuracy.json of the bench run that trained the "
                    "--model_dirs folders: their training time and command are copied from it.")
flags.DEFINE_integer("refine_steps", None, "Test-time refinement: steps on the fine grid "
                     "(default: predict.py's).")
flags.DEFINE_integer("refine_coarse_steps", None, "Refinement steps on the working grid first "
                     "(default: predict.py's).")
flags.DEFINE_integer("refine_factor", None, "Fine refinement grid = atlas grid / this factor.")
flags.DEFINE_float("refine_lr", None, "Refinement learning rate (default: predict.py's).")
flags.DEFINE_float("refine_weight_smooth", None, "Refinement smoothness weight (default: "
                   "predict.py's).")
flags.DEFINE_bool("refine_xla", True, "Refinement loss and gradient compiled with XLA (the "
                  "module's default).")
flags.DEFINE_integer("steps", 300, "Training steps per configuration trained here.")
flags.DEFINE_integer("checkpoint_every", 50, "Validation (Dice vs steps) every this many steps.")
flags.DEFINE_integer("downsample", 4, "Working resolution factor (4: 40x48x56).")
flags.DEFINE_list("enc_features", ["16", "32", "32"], "U-Net encoder (3 levels at quarter res).")
flags.DEFINE_list("dec_features", ["32", "32", "32", "16", "16"], "U-Net decoder.")
flags.DEFINE_float("g_learning_rate", 1e-3, "Generator learning rate.")
flags.DEFINE_integer("cycle_warmup_steps", 100, "Steps over which the cycle terms ramp in.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_bool("merge", True, "Keep the configurations of an existing accuracy.json that are "
                  "not rerun (each entry records its own command and commit).")
flags.DEFINE_list("extra", [], "Extra train flags for every trained config, e.g. weight_adv=0.1.")
FLAGS = flags.FLAGS

TRAIN_SUBJECTS = ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05")
VAL_SUBJECTS = anchors.SHARED_SUBJECTS


def _paths(kind, subjects):
    return ",".join(os.path.join(FLAGS.data_dir, kind, f"{s}.nii.gz") for s in subjects)


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
    """Train one preset as the bench always did; -> its run folder."""
    model_dir = os.path.join(FLAGS.work_dir, name)
    shutil.rmtree(model_dir, ignore_errors=True)
    argv = ["train", "--atlas", os.path.join(FLAGS.data_dir, "atlas.nii.gz"),
            "--atlas_labels", os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz"),
            "--unlabeled", _paths("images", TRAIN_SUBJECTS), "--model_dir", model_dir,
            "--val_images", _paths("images", VAL_SUBJECTS),
            "--val_labels", _paths("labels", VAL_SUBJECTS),
            "--preset", name, f"--steps={FLAGS.steps}",
            f"--checkpoint_every={FLAGS.checkpoint_every}", f"--downsample={FLAGS.downsample}",
            f"--enc_features={','.join(FLAGS.enc_features)}",
            f"--dec_features={','.join(FLAGS.dec_features)}",
            f"--g_learning_rate={FLAGS.g_learning_rate}", f"--seed={FLAGS.seed}",
            f"--cycle_warmup_steps={FLAGS.cycle_warmup_steps}",
            *[f"--{e}" for e in FLAGS.extra]]
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
    record = {"model_dir": os.path.abspath(model_dir), "preset": name, "steps": config["steps"],
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
    trained = name[:-len("_refined")] if name.endswith("_refined") else name
    if trained not in model_dirs:
        model_dirs[trained] = train(trained)
    refinement = None
    if name.endswith("_refined"):
        refinement = anchors.RefinementOptions(
            steps=FLAGS.refine_steps, factor=FLAGS.refine_factor, learning_rate=FLAGS.refine_lr,
            jit_compile=FLAGS.refine_xla, coarse_steps=FLAGS.refine_coarse_steps,
            weight_smooth=FLAGS.refine_weight_smooth)
    return anchors.Network(model_dirs[trained], refinement)


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
    if isinstance(segmenter, anchors.Network):
        trained = name[:-len("_refined")] if name.endswith("_refined") else name
        result["run"], result["curve"] = run_record(trained, model_dirs[trained])
        result["run"]["checkpoint"] = segmenter.checkpoint
        if name.endswith("_refined"):
            result["refinement"] = segmenter.refiner.settings()
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
              "accuracy.json.", "", "Per subject (Dice / seconds):", "",
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


def _plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    figure, ax = plt.subplots(figsize=(7, 5))
    markers = dict(zip(SETS, ("o", "s", "^", "D")))
    colours = {name: f"C{i}" for i, name in enumerate(configs)}
    for name, r in configs.items():
        for s, figures in r["sets"].items():
            ax.plot(figures["seconds_per_scan"], figures["mean_dice"], markers.get(s, "x"),
                    color=colours[name], ms=8)
        first = next(iter(r["sets"].values()))
        ax.annotate(name, (first["seconds_per_scan"], first["mean_dice"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points", color=colours[name])
    for name in configs:
        ax.plot([], [], "-", color=colours[name], label=name)
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
                               "aligned affinely to the atlas once by ltnet_tf.alignment, labels "
                               "by nearest label; every method reads these.",
                       "alignment": manifest}
    return cases, info


def main(argv):
    del argv
    for values, known, what in ((FLAGS.configs, CONFIGS, "configs"), (FLAGS.sets, SETS, "sets")):
        unknown = set(values) - set(known)
        if unknown:
            raise SystemExit(f"unknown {what}: {', '.join(sorted(unknown))}")
    model_dirs = dict(item.split("=", 1) for item in FLAGS.model_dirs)
    unknown = set(model_dirs) - set(TRAINED)
    if unknown:
        raise SystemExit(f"--model_dirs: not a trained preset: {', '.join(sorted(unknown))}")
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
        results["configs"] = {n: results["configs"][n] for n in CONFIGS if n in results["configs"]}
        r = results["configs"][name]
        print(f"=== {name}: " + ", ".join(f"{s} Dice {v['mean_dice']:.4f} "
                                          f"({v['seconds_per_scan']:.1f} s/scan)"
                                          for s, v in r["sets"].items()), flush=True)
        write_outputs(results)  # after each config, so a long run leaves partial results


if __name__ == "__main__":
    app.run(main)
