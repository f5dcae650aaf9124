"""Accuracy benchmark on real brains: affine-only vs the LT-Net ablation, one-shot.

The atlas of ../shared/data is the one labelled scan; sub-01..05 are the unlabelled training scans
(their labels are never read); sub-06, sub-07 are validation, scored with Dice on the 28 structures
of the paper's Table 1 at full resolution. Every configuration is trained with the project's own
``train_main`` and scored with its own ``predict_files`` on the same data, seed and step budget.

    python bench/accuracy.py                                     # all five, ~30 min each on 2 CPUs
    python bench/accuracy.py --configs voxelmorph,ltnet --steps 400

Writes bench/results/accuracy.json, accuracy.md, accuracy_structures.png, accuracy_curve.png.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ltnet_tf import compat  # noqa: F401,E402
from bench.provenance import git_commit  # noqa: E402

import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ltnet_tf import cli, data, evaluation  # noqa: E402
from ltnet_tf.labels import BENCHMARK_LABELS, structure_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("affine", "voxelmorph", "voxelmorph_gan", "voxelmorph_cycle", "ltnet")

flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data"), "Benchmark data.")
flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "work", "accuracy"), "Run folders.")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "bench", "results"), "Where results go.")
flags.DEFINE_list("configs", list(CONFIGS), "Configurations to run.")
flags.DEFINE_integer("steps", 300, "Training steps per configuration.")
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
VAL_SUBJECTS = ("sub-06", "sub-07")


def _paths(kind, subjects):
    return ",".join(os.path.join(FLAGS.data_dir, kind, f"{s}.nii.gz") for s in subjects)


def _summarise(per_subject_scores: dict) -> dict:
    subjects = {s: evaluation.mean_dice(scores, BENCHMARK_LABELS)
                for s, scores in per_subject_scores.items()}
    structures = {}
    for label in BENCHMARK_LABELS:
        values = [scores[label] for scores in per_subject_scores.values()]
        structures[structure_name(label)] = float(np.nanmean(values))
    return {"mean_dice": float(np.mean(list(subjects.values()))), "per_subject": subjects,
            "per_structure": structures}


def run_affine() -> dict:
    start = time.time()
    atlas_labels = data.load_label_map(os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")).data
    scores = {}
    for subject in VAL_SUBJECTS:
        reference = data.load_label_map(os.path.join(FLAGS.data_dir, "labels", f"{subject}.nii.gz"))
        scores[subject] = evaluation.dice_per_label(atlas_labels, reference.data, BENCHMARK_LABELS)
    result = _summarise(scores)
    result.update(steps=0, resolution="160x192x224 (atlas labels as they are)",
                  wall_time_s=time.time() - start, curve=[])
    return result


def run_trained(name: str) -> dict:
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
    train_time = time.time() - start
    output_dir = os.path.join(model_dir, "val_predictions")
    predict_start = time.time()
    predicted = cli.predict_files(model_dir, _paths("images", VAL_SUBJECTS), output_dir,
                                  _paths("labels", VAL_SUBJECTS))
    predict_time = time.time() - predict_start
    scores = {subject: {int(k): v for k, v in report["dice"].items()}
              for subject, report in predicted["dice"]["scans"].items()}
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(model_dir, "validation.json")) as f:
        curve = [{"step": r["step"], "val_dice": r["val_dice"]} for r in json.load(f)]
    result = _summarise(scores)
    shape = [s // config["downsample"] for s in config["atlas_shape"]]
    result.update(steps=FLAGS.steps, resolution="x".join(map(str, shape)),
                  downsample=config["downsample"],
                  unet=[config["enc_features"], config["dec_features"]],
                  wall_time_s=train_time + predict_time, train_time_s=train_time,
                  predict_time_per_scan_s=predict_time / len(VAL_SUBJECTS),
                  checkpoint_used="best (validation Dice)", curve=curve,
                  loss_weights={k: v for k, v in config.items() if k.startswith("weight_")},
                  optimisation={k: config[k] for k in ("g_learning_rate", "d_learning_rate",
                                                       "cycle_warmup_steps", "batch_size")})
    return result


def write_outputs(results: dict) -> None:
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    path = os.path.join(FLAGS.results_dir, "accuracy.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    lines = ["# Accuracy: one-shot label transfer on real brains", "",
             f"Machine: {results['machine']}", "",
             "Each configuration was run by the command and at the commit given for it below.", "",
             "Mean Dice over the 28 structures of Table 1, validation subjects "
             f"{', '.join(VAL_SUBJECTS)}, full-resolution labels.", "",
             "| config | mean Dice | " + " | ".join(VAL_SUBJECTS)
             + " | steps | working grid | U-Net | wall time |",
             "|---|---|" + "---|" * len(VAL_SUBJECTS) + "---|---|---|---|"]
    for name, r in results["configs"].items():
        per_subject = " | ".join(f"{r['per_subject'][s]:.3f}" for s in VAL_SUBJECTS)
        unet = "" if "unet" not in r else f"{r['unet'][0]} / {r['unet'][1]}"
        lines.append(f"| {name} | **{r['mean_dice']:.3f}** | {per_subject} | {r['steps']} | "
                     f"{r['resolution']} | {unet} | {r['wall_time_s'] / 60:.1f} min |")
    lines += ["", "| config | command | commit |", "|---|---|---|"]
    lines += [f"| {name} | `{r['command']}` | `{r['git_commit'][:12]}` |"
              for name, r in results["configs"].items()]
    lines += ["", "Per structure:", "",
              "| structure | " + " | ".join(results["configs"]) + " |",
              "|---|" + "---|" * len(results["configs"])]
    for label in BENCHMARK_LABELS:
        name = structure_name(label)
        lines.append(f"| {name} | " + " | ".join(
            f"{r['per_structure'][name]:.3f}" for r in results["configs"].values()) + " |")
    with open(os.path.join(FLAGS.results_dir, "accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plots(results)


def _plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [structure_name(label) for label in BENCHMARK_LABELS]
    figure, ax = plt.subplots(figsize=(14, 5))
    width = 0.8 / max(len(results["configs"]), 1)
    for i, (config, r) in enumerate(results["configs"].items()):
        ax.bar(np.arange(len(names)) + i * width, [r["per_structure"][n] for n in names], width,
               label=f"{config} ({r['mean_dice']:.3f})")
    ax.set_xticks(np.arange(len(names)) + 0.4)
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(FLAGS.results_dir, "accuracy_structures.png"), dpi=90)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(6, 4))
    for config, r in results["configs"].items():
        if r.get("curve"):
            ax.plot([c["step"] for c in r["curve"]], [c["val_dice"] for c in r["curve"]], "o-",
                    label=config)
    if "affine" in results["configs"]:
        ax.axhline(results["configs"]["affine"]["mean_dice"], color="gray", ls="--", label="affine")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation mean Dice")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(FLAGS.results_dir, "accuracy_curve.png"), dpi=90)
    plt.close(figure)


def main(argv):
    del argv
    unknown = set(FLAGS.configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs: {', '.join(sorted(unknown))}")
    import tensorflow as tf
    results = {"command": " ".join(["python", *sys.argv]), "git_commit": git_commit(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"TF {tf.__version__}, GPU: {bool(tf.config.list_physical_devices('GPU'))}",
               "train_subjects": TRAIN_SUBJECTS, "val_subjects": VAL_SUBJECTS,
               "labels": list(BENCHMARK_LABELS), "configs": {}}
    previous = os.path.join(FLAGS.results_dir, "accuracy.json")
    if FLAGS.merge and os.path.isfile(previous):
        with open(previous) as f:
            kept = json.load(f)["configs"]
        results["configs"] = {name: r for name, r in kept.items()
                              if name not in FLAGS.configs and "git_commit" in r}
    for name in FLAGS.configs:
        print(f"=== {name}", flush=True)
        results["configs"][name] = run_affine() if name == "affine" else run_trained(name)
        results["configs"][name].update(command=results["command"], git_commit=results["git_commit"])
        results["configs"] = {n: results["configs"][n] for n in CONFIGS if n in results["configs"]}
        print(f"=== {name}: mean Dice {results['configs'][name]['mean_dice']:.4f}", flush=True)
        write_outputs(results)  # after each config, so a long run leaves partial results


if __name__ == "__main__":
    app.run(main)
