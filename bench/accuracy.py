"""Accuracy and time per scan on real brains, every method in one run: Dice of the 28 structures
of the paper's Table 1 on the atlas grid, on sub-06/07 and six MICCAI 2012 subjects
(``harness.validation_sets``); the product through ``harness.Product``, ANTs ``bench.anchors``:

    affine                    the atlas labels as they are (no registration): the floor
    ants_syn, ants_syn_half   ANTs SyN with antspyx's defaults, on the full grid / on 2 mm grids
    convexadam                ConvexAdam's MIND-SSC registration with its package defaults
    ltnet, vxm_half, ...      a trained run folder's G_F alone (``--model_dirs``: train.py's
                              README recipe on the atlas and 17 unlabelled scans)
    <start>_refined           the same G_F (or ``identity``: no network) + predict.py's refinement
    <start>_c<N>[_f<M>]       a refinement budget: N steps on the quarter grid, then M at half
                              resolution; ``identity_c0_f0`` times the fixed cost

    python -m bench.accuracy --configs affine,ants_syn_half --sets shared      # a quick look
    python -m bench.accuracy --model_dirs ltnet=RUN                            # the frontier

Writes bench/results/accuracy.json, accuracy.md and accuracy_frontier.png (Dice against seconds
per scan, with the budget curves of both starts).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import gc
import os
import re

import numpy as np
from absl import app, flags

from bench import anchors, harness
from bench.harness import table
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io.labels import BENCHMARK_LABELS

TRAINED = ("voxelmorph", "voxelmorph_gan", "voxelmorph_cycle", "ltnet")
STARTS = ["identity", *TRAINED]  # and the names given to --model_dirs (main)
FIXED = ("affine", "ants_syn_half", "ants_syn", "convexadam")
BUDGET = re.compile(r"^(?P<start>[a-z_]+?)_c(?P<coarse>\d+)(?:_f(?P<fine>\d+))?$")
SETS = ("shared", "miccai2012")
SWEEP = ((10, 0), (25, 0), (25, 10), (50, 25), (100, 25))  # (coarse, fine) steps
FRONTIER = ("affine", "ants_syn_half", "ants_syn", "ltnet", "ltnet_refined", "identity_refined",
            "identity_c0_f0",
            *(f"{start}_c{c}_f{f}" for start in ("ltnet", "identity") for c, f in SWEEP))
TRAIN_SUBJECTS = ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05")  # and MICCAI 1009-1125

harness.define_flags("accuracy", merge=True)
flags.DEFINE_list("configs", list(FRONTIER), "Configurations to run, in this order.")
flags.DEFINE_list("sets", list(SETS), "Validation sets; the first one gives the headline figures.")
flags.DEFINE_list("model_dirs", [], "Trained run folders as name=path (ltnet=RUN1,vxm_half="
                  "RUN2); <name>_refined and <name>_c<N>_f<M> use <name>'s folder.")
FLAGS = flags.FLAGS


def _roles() -> dict:
    """Folders of this machine named in the results: RUN_<NAME> for --model_dirs."""
    return {**{path: f"RUN_{name.upper()}" for name, path in (
        item.split("=", 1) for item in FLAGS.model_dirs)},
        FLAGS.work_dir: "WORK"}


def parse_config(name: str) -> dict:
    """{'kind': fixed|network|refined|budget, 'start', 'refinement'}; SystemExit if unknown."""
    defaults = RefinementSettings()
    if name in FIXED:
        return {"kind": "fixed", "start": None, "refinement": None}
    if name in STARTS and name != "identity":
        return {"kind": "network", "start": name, "refinement": None}
    if name.endswith("_refined") and name[:-len("_refined")] in STARTS:
        return {"kind": "refined", "start": name[:-len("_refined")], "refinement": defaults}
    budget = BUDGET.match(name)
    if budget and budget["start"] in STARTS:  # coarse steps on the quarter grid for every start
        return {"kind": "budget", "start": budget["start"], "refinement": defaults.replace(
            coarse_steps=int(budget["coarse"]), steps=int(budget["fine"] or 0), coarse_factor=4)}
    raise SystemExit(f"unknown configuration {name!r}: one of {', '.join(FIXED)}, a preset "
                     f"({', '.join(TRAINED)}), <start>_refined or <start>_c<N>[_f<M>] with "
                     f"start in {', '.join(STARTS)}")


def run_record(name: str, model_dir: str) -> tuple:
    """A run folder's config essentials and validation curve."""
    config = harness.read_json(os.path.join(model_dir, "config.json"))
    curve = [{"step": r["step"], "val_dice": r["val_dice"]}
             for r in harness.read_json(os.path.join(model_dir, "validation.json")) or []]
    record = {"model_dir": harness.portable(model_dir, _roles()), "preset": name,
              "steps": config["steps"], "downsample": config["downsample"],
              "working_grid": "x".join(str(s // config["downsample"])
                                       for s in config["atlas_shape"]),
              "unet": [config["enc_features"], config["dec_features"]],
              "loss_weights": {k: v for k, v in config.items() if k.startswith("weight_")},
              "optimisation": {k: config[k] for k in ("g_learning_rate", "d_learning_rate",
                                                      "cycle_warmup_steps", "batch_size")},
              "train_time_s": None, "training_source": None}  # train.py's time: not recorded
    return record, curve


def make_segmenter(name: str, model_dirs: dict):
    atlas = os.path.join(FLAGS.data_dir, "atlas.nii.gz")
    atlas_labels = os.path.join(FLAGS.data_dir, "atlas_labels.nii.gz")
    if name == "affine":
        return anchors.AtlasLabels(atlas_labels)
    if name == "convexadam":
        return anchors.ConvexAdam(atlas, atlas_labels)
    if name.startswith("ants_syn"):
        return anchors.AntsAtlases([atlas], [atlas_labels], {"syn": ("syn", 1)},
                                   spacing=2.0 if name.endswith("_half") else None)
    config = parse_config(name)
    if config["start"] == "identity":
        return harness.Product(None, config["refinement"], atlases=[(atlas, atlas_labels)])
    if config["start"] not in model_dirs:
        raise SystemExit(f"{name}: no run folder; give --model_dirs {config['start']}=RUN")
    return harness.Product(model_dirs[config["start"]], config["refinement"])


def evaluate(name: str, cases: list, model_dirs: dict) -> dict:
    load_average = {"start": os.getloadavg()}  # the machine is shared: how busy it was
    segmenter = make_segmenter(name, model_dirs)
    print(f"=== {name}: {segmenter.description}; loaded in {segmenter.load_seconds:.1f} s",
          flush=True)
    records = [harness.score(case, segmenter.segment(
        case.image_path, case.output(FLAGS.work_dir, name)), name) for case in cases]
    sets = {}
    for s in dict.fromkeys(r["set"] for r in records):
        ours = [r for r in records if r["set"] == s]
        sets[s] = harness.dice_figures(ours)
        if ours[0].get("refinement_loss"):
            sets[s]["per_subject_refinement_loss"] = {r["subject"]: r["refinement_loss"]
                                                      for r in ours}
    primary = next(iter(sets))
    result = {"method": segmenter.description, **{k: sets[primary][k] for k in (
                  "mean_dice", "per_subject", "per_structure", "seconds_per_scan",
                  "folding_fraction")},
              "figures_from_set": primary, "sets": sets,
              "seconds_per_scan_all_sets": float(np.mean([r["seconds"] for r in records])),
              "model_load_s": segmenter.load_seconds, "curve": [],
              "load_average_1_5_15min": {**load_average, "end": os.getloadavg()}}
    if isinstance(segmenter, harness.Product):
        start = parse_config(name)["start"]
        if start != "identity":
            result["run"], result["curve"] = run_record(start, model_dirs[start])
            result["run"]["checkpoint"] = harness.portable(segmenter.checkpoint, _roles())
        result["refinement"] = segmenter.predictor.refinement_record()
        refine = [r["refine_seconds"] for r in records if r["refine_seconds"] is not None]
        result["refine_seconds_per_scan"] = float(np.mean(refine)) if refine else None
    del segmenter
    gc.collect()
    return result


# ------------------------------------------------------------------------------- outputs
def _set_title(results: dict, set_name: str) -> str:
    return f"{set_name} ({len(results['sets'][set_name]['subjects'])})"


def markdown(results: dict) -> list:
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
    lines += [f"- **{s}**: {', '.join(results['sets'][s]['subjects'])}. "
              f"{results['sets'][s]['note']}" for s in sets]
    rows = []
    for name, r in configs.items():
        run = r.get("run")
        rows.append([name, *(f"**{r['sets'][s]['mean_dice']:.3f}**" if s in r["sets"] else "–"
                             for s in sets), f"{r['seconds_per_scan_all_sets']:.1f}",
                     f"{100 * np.mean([v['folding_fraction'] for v in r['sets'].values()]):.3f}%",
                     f"{r['model_load_s']:.1f} s", "" if not run else (
                         f"{run['steps']} steps at {run['working_grid']}"
                         + (f", {run['train_time_s'] / 60:.0f} min" if run.get("train_time_s")
                            else ""))])
    lines += ["", *table(["config", *(f"Dice {_set_title(results, s)}" for s in sets), "s/scan",
                          "folding", "load", "G_F training"], rows),
              "", "s/scan and folding: over all scans of every set (one grid size); per set in "
              "accuracy.json.", "", *network_vs_identity(configs, sets),
              "", "Per subject (Dice / seconds):", ""]
    lines += table(["set", "subject", *configs], [
        [s, subject, *(f"{r['sets'][s]['per_subject'][subject]:.3f} / "
                       f"{r['sets'][s]['per_subject_seconds'][subject]:.0f} s"
                       if s in r["sets"] else "–" for r in configs.values())]
        for s in sets for subject in results["sets"][s]["subjects"]])
    lines += ["", *table(["config", "method", "command", "commit"], [
        [name, r["method"], f"`{r['command']}`", f"`{r['git_commit'][:12]}`"]
        for name, r in configs.items()])]
    for s in sets:
        lines += ["", f"Per structure, {s}:", "", *harness.per_structure(
            {n: r["sets"][s] for n, r in configs.items() if s in r["sets"]})]
    return lines


def network_vs_identity(configs: dict, sets: list) -> list:
    """Each configuration starting from G_F against the best identity start within 10% of its
    seconds per scan; the refinement's fixed cost and cost per coarse step."""
    network = {n: r for n, r in configs.items()
               if parse_config(n)["start"] not in (None, "identity")}
    identity = {n: r for n, r in configs.items() if parse_config(n)["start"] == "identity"}
    if not network or not identity:
        return []
    rows = []
    for name, r in network.items():
        seconds = r["seconds_per_scan_all_sets"]
        dice = [r["sets"][s]["mean_dice"] for s in sets]
        close = {n: i for n, i in identity.items()
                 if abs(i["seconds_per_scan_all_sets"] - seconds) <= 0.1 * seconds}
        row = [name, f"{seconds:.2f}", *(f"{d:.3f}" for d in dice)]
        if not close:
            rows.append(row + ["none", "", *[""] * (2 * len(sets))])
            continue
        best = max(close, key=lambda n: np.mean([close[n]["sets"][s]["mean_dice"] for s in sets]))
        other = [close[best]["sets"][s]["mean_dice"] for s in sets]
        rows.append(row + [best, f"{close[best]['seconds_per_scan_all_sets']:.2f}",
                           *(f"{d:.3f}" for d in other),
                           *(f"{a - b:+.3f}" for a, b in zip(dice, other))])
    lines = ["## What the trained network buys", "",
             "Each configuration starting from G_F against the identity-start configuration of "
             "the highest Dice among those within 10% of its seconds per scan (none: no identity "
             "budget that close).", "", *table(
                 ["network config", "s/scan", *(f"Dice {s}" for s in sets),
                  "identity at equal time", "s/scan", *(f"Dice {s}" for s in sets),
                  *(f"difference {s}" for s in sets)], rows)]
    fixed = configs.get("identity_c0_f0", {}).get("refine_seconds_per_scan")
    if fixed is not None:
        lines += ["", f"Refinement's fixed cost (0 steps, identity start): {fixed:.3f} s per scan "
                  f"(the refine stage alone)."]
        for r in identity.values():
            settings, seconds = r.get("refinement"), r.get("refine_seconds_per_scan")
            if settings and seconds and settings["coarse_steps"] and not settings["steps"]:
                lines.append(f"Per coarse step: {(seconds - fixed) / settings['coarse_steps']:.4f}"
                             f" s (from the coarse-only budgets).")
                break
    return lines + [""]


def plots(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, folder = results["configs"], FLAGS.results_dir
    markers = dict(zip(SETS, ("o", "s")))
    curves = {start: [n for n in configs if parse_config(n)["kind"] in ("refined", "budget")
                      and parse_config(n)["start"] == start] for start in STARTS}
    single = [n for n in configs if parse_config(n)["kind"] in ("fixed", "network")]
    colours = {n: f"C{i}" for i, n in enumerate([*single, *[s for s in STARTS if curves[s]]])}
    sets = list(dict.fromkeys(s for r in configs.values() for s in r["sets"]))
    figure, ax = plt.subplots(figsize=(8, 5.5))
    for s in sets:
        for start, names in curves.items():  # a refinement budget curve per start and set
            points = sorted((configs[n]["sets"][s]["seconds_per_scan"],
                             configs[n]["sets"][s]["mean_dice"]) for n in names
                            if s in configs[n]["sets"])
            if points:
                ax.plot(*zip(*points), "-" + markers.get(s, "x"), color=colours[start], ms=6,
                        alpha=0.8)
        for name in (n for n in single if s in configs[n]["sets"]):
            figures = configs[name]["sets"][s]
            ax.plot(figures["seconds_per_scan"], figures["mean_dice"], markers.get(s, "x"),
                    color=colours[name], ms=9)
    for name in single:
        first = next(iter(configs[name]["sets"].values()))
        ax.annotate(name, (first["seconds_per_scan"], first["mean_dice"]), fontsize=7,
                    xytext=(5, 4), textcoords="offset points", color=colours[name])
        ax.plot([], [], "o", color=colours[name], label=name)
    for start in (s for s in STARTS if curves[s]):
        label = ("refinement from the identity (no network)" if start == "identity"
                 else f"refinement from {start}'s G_F")
        ax.plot([], [], "-", color=colours[start], label=f"{label}: budgets")
    for s in sets:
        ax.plot([], [], markers.get(s, "x"), color="gray", label=_set_title(results, s))
    ax.set(xscale="log", xlabel="seconds per scan (end to end, this machine)",
           ylabel="mean Dice (28 structures)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "accuracy_frontier.png"), dpi=100)

    plt.close("all")


def main(argv):
    del argv
    model_dirs = dict(item.split("=", 1) for item in FLAGS.model_dirs)
    STARTS.extend(name for name in model_dirs if name not in STARTS)
    for name in FLAGS.configs:
        parse_config(name)
    unknown = set(FLAGS.sets) - set(SETS)
    if unknown:
        raise SystemExit(f"unknown sets: {', '.join(sorted(unknown))}")
    cases, sets = harness.validation_sets(FLAGS.data_dir, FLAGS.work_dir, FLAGS.sets)
    results = {"command": harness.command_line(_roles()), "git_commit": harness.git_commit(),
               "machine": harness.machine_line(), "train_subjects": TRAIN_SUBJECTS,
               "val_subjects": harness.SHARED_SUBJECTS, "sets": sets,
               "labels": list(BENCHMARK_LABELS), "configs": {}}
    kept = harness.read_json(os.path.join(FLAGS.results_dir, "accuracy.json"), FLAGS.merge)
    if kept:  # only entries measured the same way (per-set figures) can share a table
        results["configs"] = {name: r for name, r in kept["configs"].items()
                              if name not in FLAGS.configs and "sets" in r}
        # the run folders of kept configurations were named by an earlier --model_dirs
        STARTS.extend(name for name in results["configs"] if name not in (*FIXED, *STARTS)
                      and not name.endswith("_refined") and not BUDGET.match(name))
        results["sets"] = {**kept.get("sets", {}), **sets}
    for name in FLAGS.configs:
        r = results["configs"][name] = evaluate(name, cases, model_dirs)
        r.update(command=results["command"], git_commit=results["git_commit"])
        print(f"=== {name}: " + ", ".join(f"{s} Dice {v['mean_dice']:.4f} "
                                          f"({v['seconds_per_scan']:.1f} s/scan)"
                                          for s, v in r["sets"].items()), flush=True)
        # after each configuration, so a long run leaves partial results
        harness.write_results(results, markdown, os.path.join(FLAGS.results_dir, "accuracy"))
        plots(results)


if __name__ == "__main__":
    app.run(main)
