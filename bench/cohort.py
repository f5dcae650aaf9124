"""Cohort throughput of predict.py as a user runs it, before and after a change, in one run: each
figure from predict.py in a fresh process (``harness.run_measured``), one run at a time after
written files are flushed and a rest; this process never imports TensorFlow.

    stages    native 256³ scans (and renamed copies) by the ``--before`` commit (a git worktree),
              the current code with --noqc and with QC: per-stage seconds from prediction.json
    dice      both versions at equal settings: native sub-06/07 and MICCAI 2012 on their grids
    memory    the current predict.py on 2 and on 100 small copies of a scan: peak RSS ratio
    refusal   both versions on bad inputs: seconds to exit, exit code, last stderr line, model
              files of the run folder opened (strace, in a second, untimed run)

    python -m bench.cohort --model_dir RUN               # about 15-20 min on 2 CPU cores
    python -m bench.cohort --model_dir RUN --parts memory --memory_scans 4     # a smoke test

Writes bench/results/cohort.json and cohort.md.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import nibabel as nib
import nibabel.processing
import numpy as np
from absl import app, flags

from bench import harness
from bench.harness import table

PARTS = ("stages", "dice", "memory", "refusal")
BAD_INPUTS = {"truncated": "a .nii.gz cut to half its bytes (sub-06)",
              "flat": "a 2D image: one 256×256 slice of sub-06",
              "not_brain": "a 256³ 1 mm volume whose tissue is a ball 40 mm across (33 ml)"}
STAGE_ORDER = ("read", "wait", "align", "network", "refine", "labels", "network_and_labels",
               "write", "scores", "qc", "total")  # as a scan meets them
RUNS = {"before": "before", "after": "after (--noqc)", "after_qc": "after (QC on)"}

harness.define_flags("cohort", merge=True)
flags.DEFINE_string("model_dir", None, "A trained run folder (train.py) both versions use.")
flags.DEFINE_string("before", "188b996", "The commit compared against (a git worktree of it).")
flags.DEFINE_list("parts", list(PARTS), "Parts to run (others kept from cohort.json: --merge).")
flags.DEFINE_list("native_scans", ["sub-06", "sub-07"], "Native scans of the stages cohort "
                  "(native/images/<name>.mgz); their labels score the native Dice set.")
flags.DEFINE_integer("copies", 1, "Renamed copies (symlinks) of each native scan in the stages "
                     "cohort, so more scans are warm.", lower_bound=0)
flags.DEFINE_list("miccai_subjects", list(harness.MICCAI_SUBJECTS), "MICCAI 2012 Dice set.")
flags.DEFINE_string("memory_scan", "sub-06", "Native scan copied (2 mm) for the memory part.")
flags.DEFINE_integer("memory_scans", 100, "Scans of the long memory run.", lower_bound=2)
flags.DEFINE_integer("memory_few", 2, "Scans of the short memory run.", lower_bound=1)
flags.DEFINE_float("settle_seconds", 5.0, "Rest before each measured run.", lower_bound=0)
flags.DEFINE_bool("trace", True, "Refusal: list the run folder's files opened (strace).")
FLAGS = flags.FLAGS


@dataclass
class Version:
    """A checkout whose predict.py runs with its own ltnet_tf (PYTHONPATH) and this Python."""
    name: str
    root: str
    commit: str

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": self.root}


def _run(*argv, **options) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **options).stdout


class Context:
    """The versions compared (``before`` in a git worktree, removed by ``close``) and folders."""

    def __init__(self, need_before: bool):
        self.work = os.path.abspath(FLAGS.work_dir)
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.current, self.before = Version("after", harness.ROOT, harness.git_commit()), None
        git = ("git", "-C", harness.ROOT)
        if need_before:
            commit = _run(*git, "rev-parse", "--verify", f"{FLAGS.before}^{{commit}}").strip()
            path = os.path.join(self.work, f"before-{commit[:10]}")
            if os.path.isdir(path):
                _run(*git, "worktree", "remove", "--force", path)
            _run(*git, "worktree", "prune")
            _run(*git, "worktree", "add", "--detach", path, commit)
            self.before = Version("before", path, commit)
        try:  # each version compiled once, its own ltnet_tf imported, TensorFlow and the run
            for v in self.versions():  # folder read once: no measured run pays for them
                _run(sys.executable, "-m", "compileall", "-q", os.path.join(v.root, "ltnet_tf"),
                     env=v.env())
                found = _run(sys.executable, "-c", "import os, ltnet_tf; from ltnet_tf import "
                             "compat; import tensorflow; print(os.path.dirname(os.path.abspath("
                             "ltnet_tf.__file__)))", env=v.env(), cwd=self.work).strip()
                if os.path.realpath(found) != os.path.realpath(os.path.join(v.root, "ltnet_tf")):
                    raise SystemExit(f"{v.name}: ltnet_tf imported from {found}")
            for folder, _, names in os.walk(os.path.abspath(FLAGS.model_dir)):
                for name in names:
                    with open(os.path.join(folder, name), "rb") as f:
                        while f.read(1 << 24):
                            pass
        except BaseException:
            self.close()
            raise

    def versions(self) -> list:
        return [v for v in (self.before, self.current) if v is not None]

    def close(self) -> None:
        if self.before is not None:
            _run("git", "-C", harness.ROOT, "worktree", "remove", "--force", self.before.root)

    def roles(self, text) -> str:
        roles = {self.work: "WORK", FLAGS.model_dir: "RUN", sys.executable: "python"}
        if self.before is not None:
            roles[self.before.root] = "BEFORE"
        return harness.portable(text, roles)

    def predict(self, version: Version, images: str, output_dir: str, log: str, extra=(),
                settle: bool = True) -> dict:
        """predict.py of ``version`` on ``images``, measured; the output folder emptied first."""
        shutil.rmtree(output_dir, ignore_errors=True)
        argv = [sys.executable, os.path.join(version.root, "predict.py"), "--model_dir",
                os.path.abspath(FLAGS.model_dir), "--images", images, "--output_dir",
                output_dir, *extra]
        run = harness.run_measured(argv, os.path.join(self.logs, log), env=version.env(),
                                   cwd=version.root,
                                   settle_seconds=FLAGS.settle_seconds if settle else 0.0)
        lines = harness.log_lines(run["stderr"])
        run.update(command=self.roles(f"PYTHONPATH={version.root} " + shlex.join(argv)),
                   commit=version.commit, stdout=self.roles(run["stdout"]),
                   stderr=self.roles(run["stderr"]))
        if run["returncode"] != 0 and not log.startswith("refusal"):
            raise SystemExit(f"{run['command']} exited with {run['returncode']}: "
                             f"{lines[-1] if lines else ''} (log: {run['stderr']})")
        return {**run, "_argv": argv, "_stderr_lines": lines}


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def scan_seconds(output_dir: str) -> dict:
    """{scan: {stage: seconds}} from a run's prediction.json, in the order segmented."""
    with open(os.path.join(output_dir, "prediction.json")) as f:
        return {name: record["seconds"] for name, record in json.load(f)["scans"].items()}


def first_and_warm(scans: dict) -> dict:
    names, warm = list(scans), {}
    for name in names[1:]:
        for stage, value in scans[name].items():
            warm.setdefault(stage, []).append(value)
    return {"first_scan": names[0], "first": scans[names[0]], "warm_scans": names[1:],
            "warm": {stage: round(float(np.mean(v)), 3) for stage, v in warm.items()}}


def _segmentations(folder: str) -> dict:
    return {name[:-len("_seg.nii.gz")]: np.asanyarray(nib.load(os.path.join(folder, name)).dataobj)
            for name in sorted(os.listdir(folder)) if name.endswith("_seg.nii.gz")}


def voxels_differing(folder_a: str, folder_b: str) -> dict:
    b = _segmentations(folder_b)
    return {scan: {"differ": int((a != b[scan]).sum()),
                   "labelled": int(((a > 0) | (b[scan] > 0)).sum())}
            for scan, a in _segmentations(folder_a).items()}


def dice_scores(output_dir: str, references: dict) -> dict:
    """Dice of each <scan>_seg.nii.gz against its reference (28 structures); NaN -> None."""
    from ltnet_tf.io import evaluation
    from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

    def rounded(values):
        finite = [v for v in values if v is not None and np.isfinite(v)]
        return round(float(np.mean(finite)), 4) if finite else None

    segmentations, per_subject, per_label = _segmentations(output_dir), {}, {}
    for scan, path in references.items():
        reference = np.asanyarray(nib.load(path).dataobj)
        if segmentations[scan].shape != reference.shape:
            raise SystemExit(f"{scan}_seg.nii.gz: grid {segmentations[scan].shape} is not its "
                             f"reference's {reference.shape}")
        dice = evaluation.dice_per_label(segmentations[scan], reference, BENCHMARK_LABELS)
        per_subject[scan] = rounded([evaluation.mean_dice(dice, BENCHMARK_LABELS)])
        for label, value in dice.items():
            per_label.setdefault(label, []).append(value)
    return {"per_subject": per_subject, "mean_dice": rounded(per_subject.values()),
            "per_structure": {structure_name(k): rounded(v) for k, v in per_label.items()}}


# ------------------------------------------------------------------------------- parts
def stages_part(context: Context) -> dict:
    folder = os.path.join(context.work, "inputs", "native")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for scan in FLAGS.native_scans:
        source = os.path.join(FLAGS.data_dir, "native", "images", f"{scan}.mgz")
        for suffix in ["", *"bcdefghijklmnopqrstuvwxyz"[:FLAGS.copies]]:
            os.symlink(source, os.path.join(folder, f"{scan}{suffix}.mgz"))
    plan = {"before": (context.before, ()), "after": (context.current, ("--noqc",)),
            "after_qc": (context.current, ("--qc",))}
    runs, outputs = {}, {}
    for label, (version, extra) in plan.items():
        outputs[label] = os.path.join(context.work, "stages", label)
        run = context.predict(version, folder, outputs[label], f"stages_{label}", extra)
        scans = scan_seconds(outputs[label])
        runs[label] = {**_public(run), "version": version.name, "scans": scans,
                       **first_and_warm(scans)}
        print(f"stages {label}: {run['wall_s']:.1f} s wall, {run['peak_rss_mib']:.0f} MiB, warm "
              f"{runs[label]['warm'].get('total', float('nan')):.1f} s/scan", flush=True)
    before, after = runs["before"]["warm"], runs["after"]["warm"]
    return {"cohort": list(runs["after"]["scans"]), "runs": runs,
            "warm_ratio_after_over_before": {s: round(after[s] / before[s], 3) for s in after
                                             if before.get(s, 0) > 0},
            "voxels_differing": {  # the same code in two processes: run-to-run variation
                "after_vs_after_qc": voxels_differing(outputs["after"], outputs["after_qc"]),
                "before_vs_after": voxels_differing(outputs["before"], outputs["after"])},
            "outputs": outputs}


def dice_part(context: Context, stages: dict = None) -> dict:
    """Both versions at equal settings on each set; native reuses the stages' outputs."""
    from ltnet_tf.io.labels import BENCHMARK_LABELS

    sets = {}
    for name, subjects, ext in (("native", FLAGS.native_scans, "mgz"),
                                ("miccai2012", FLAGS.miccai_subjects, "nii.gz")):
        root = os.path.join(FLAGS.data_dir, name)
        references = {s: os.path.join(root, "labels", f"{s}.{ext}") for s in subjects}
        figures = {}
        for label, version, extra in (("before", context.before, ()),
                                      ("after", context.current, ("--noqc",))):
            output_dir, source = (stages or {}).get("outputs", {}).get(label), "stages part"
            if name != "native" or output_dir is None:
                output_dir = os.path.join(context.work, "dice", name, label)
                source = context.predict(version, ",".join(
                    os.path.join(root, "images", f"{s}.{ext}") for s in subjects), output_dir,
                    f"dice_{name}_{label}", extra, settle=False)["command"]
            figures[label] = {**dice_scores(output_dir, references), "segmented_by": source,
                              "commit": version.commit}
        before, after = figures["before"]["mean_dice"], figures["after"]["mean_dice"]
        sets[name] = {"subjects": list(references), **figures, "difference":
                      None if None in (before, after) else round(after - before, 4)}
        print(f"dice {name}: before {before}, after {after}", flush=True)
    return {"labels": list(BENCHMARK_LABELS), "sets": sets}


def memory_part(context: Context) -> dict:
    """Peak RSS of the current predict.py (--noqc) on few and on many 2 mm copies of a scan."""
    small = nibabel.processing.conform(
        nib.load(os.path.join(FLAGS.data_dir, "native", "images", f"{FLAGS.memory_scan}.mgz")),
        out_shape=(128, 128, 128), voxel_size=(2.0, 2.0, 2.0), order=1, orientation="LIA",
        out_class=nib.Nifti1Image)
    runs = {}
    for label, count in (("few", FLAGS.memory_few), ("many", FLAGS.memory_scans)):
        folder = os.path.join(context.work, "inputs", f"small_{count}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        names = [os.path.join(folder, f"scan-{i:0{len(str(count))}d}.nii.gz")
                 for i in range(1, count + 1)]
        nib.save(small, names[0])
        for name in names[1:]:
            shutil.copyfile(names[0], name)
        output_dir = os.path.join(context.work, "memory", label)
        run = context.predict(context.current, folder, output_dir, f"memory_{label}", ("--noqc",))
        scans = scan_seconds(output_dir)
        summary = first_and_warm(scans)
        runs[label] = {**_public(run), "scans": len(scans), "first": summary["first"],
                       "warm": summary["warm"], "totals": [r["total"] for r in scans.values()]}
        print(f"memory {len(scans)} scans: {run['peak_rss_mib']:.0f} MiB", flush=True)
    return {"scan": f"{FLAGS.memory_scan} resampled to 2 mm voxels, 128³ (NIfTI)", "runs": runs,
            "target_ratio": 1.10, "peak_rss_ratio": round(
                runs["many"]["peak_rss_mib"] / runs["few"]["peak_rss_mib"], 3)}


def bad_inputs(folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, f"{name}.nii.gz") for name in BAD_INPUTS}
    with open(os.path.join(FLAGS.data_dir, "images", "sub-06.nii.gz"), "rb") as f:
        whole = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(whole[:len(whole) // 2])
    native = nib.load(os.path.join(FLAGS.data_dir, "native", "images", "sub-06.mgz"))
    nib.save(nib.Nifti1Image(np.asarray(native.dataobj)[:, :, native.shape[2] // 2],
                             native.affine), paths["flat"])
    z, y, x = np.ogrid[-128:128, -128:128, -128:128]
    ball = z * z + y * y + x * x <= 20 ** 2
    values = np.random.default_rng(0).integers(100, 200, ball.shape, dtype=np.uint8) * ball
    nib.save(nib.Nifti1Image(values, np.eye(4)), paths["not_brain"])
    return paths


def refusal_part(context: Context) -> dict:
    rows = []
    for name, path in bad_inputs(os.path.join(context.work, "inputs", "bad")).items():
        for version in context.versions():
            output_dir = os.path.join(context.work, "refusal", f"{version.name}_{name}")
            log = f"refusal_{version.name}_{name}"
            run = context.predict(version, path, output_dir, log)
            row = {"input": name, "what": BAD_INPUTS[name], "version": version.name,
                   **_public(run), "message": context.roles(
                       run["_stderr_lines"][-1] if run["_stderr_lines"] else ""),
                   "stderr_lines": len(run["_stderr_lines"]),
                   "outputs_left": (sorted(os.listdir(output_dir))
                                    if os.path.isdir(output_dir) else None)}
            if FLAGS.trace:
                shutil.rmtree(output_dir, ignore_errors=True)
                opened = harness.files_opened(run["_argv"], FLAGS.model_dir, os.path.join(
                    context.logs, f"{log}.strace"), env=version.env(), cwd=version.root)
                row.update(run_files_opened=opened, model_loaded=None if opened is None else any(
                    os.path.basename(p) in ("saved_model.pb", "generator.h5")
                    or p.endswith(".index") or ".data-" in p for p in opened))
            rows.append(row)
            print(f"refusal {name} {version.name}: exit {run['returncode']} after "
                  f"{run['wall_s']:.1f} s: {row['message']}", flush=True)
    argv = [sys.executable, "-c", "from ltnet_tf import compat; import tensorflow"]
    floor = harness.run_measured(argv, os.path.join(context.logs, "import_tensorflow"),
                                 env=context.current.env(), cwd=context.current.root,
                                 settle_seconds=FLAGS.settle_seconds)
    return {"inputs": BAD_INPUTS, "runs": rows, "import_tensorflow": {
        "command": context.roles(f"PYTHONPATH={harness.ROOT} " + shlex.join(argv)),
        **{k: floor[k] for k in ("returncode", "wall_s", "cpu_s", "peak_rss_mib", "load_start",
                                 "load_end")}}}


# ------------------------------------------------------------------------------- cohort.md
def _s(value) -> str:
    return harness.cell(value, ".2f")


def _load(run: dict) -> str:
    return f"{run['load_start'][0]:.2f} → {run['load_end'][0]:.2f}"


def _processes(runs: dict, names: dict) -> list:
    return table(["run", "scans", "wall s (start to exit)", "CPU s", "peak RSS MiB",
                  "load (1 min) start → end", "exit"],
                 [[names.get(k, k), r["scans"] if isinstance(r["scans"], int) else len(r["scans"]),
                   f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
                   _load(r), r["returncode"]] for k, r in runs.items()])


def _made_by(part: dict, runs: dict = None, names: dict = None) -> list:
    """The benchmark's command and commit, and the predict.py command of each run."""
    before = part.get("before_commit")
    return (["", f"Benchmark: `{part['command']}` at `{part['git_commit'][:12]}`"
             + (f", before = `{before[:12]}`" if before else "") + "."]
            + ([""] + [f"- {names.get(k, k)}: `{r['command']}`" for k, r in runs.items()]
               if runs else []))


def stages_section(part: dict) -> list:
    runs, ratio = part["runs"], part["warm_ratio_after_over_before"]
    stages = [s for s in STAGE_ORDER if any(s in r["warm"] or s in r["first"]
                                            for r in runs.values())]
    stages += sorted({s for r in runs.values() for s in r["warm"]} - set(stages))
    before, after, differing = runs["before"], runs["after"], part["voxels_differing"]
    return ["## Seconds per scan, per stage", "",
            f"Cohort: {', '.join(part['cohort'])} (native 256³ scans and renamed copies), one "
            f"fresh predict.py process per version. First: the first scan; warm: the mean of "
            f"the {len(part['cohort']) - 1} others. From each run's prediction.json; total is "
            "a scan's time on the way (the old code reads the scan inside it; the new one "
            "reads the next scan in the background while one is segmented and counts only "
            "the wait; the old code records align, network, refine, labels and total only).", "",
            *table(["stage", "before first", "before warm", "after first", "after warm",
                    "warm after / before", "after+QC first", "after+QC warm"],
                   [[s, *(_s(runs[k][when].get(s)) for k in ("before", "after")
                          for when in ("first", "warm")), harness.cell(ratio.get(s), ".2f"),
                     *(_s(runs["after_qc"][when].get(s)) for when in ("first", "warm"))]
                    for s in stages]),
            "", "The processes:", "", *_processes(runs, RUNS), "",
            f"Wall time after / before: {after['wall_s'] / before['wall_s']:.2f}; peak RSS after "
            f"/ before: {after['peak_rss_mib'] / before['peak_rss_mib']:.2f}.", "",
            "Voxels labelled differently (of those labelled in either): after vs after+QC is "
            "the same code in two processes (the QC picture is drawn after the segmentation), "
            "so it is the run-to-run variation; before vs after is the change.", "",
            *table(["scan", "after vs after+QC", "before vs after"],
                   [[scan, *(f"{d['differ']} of {d['labelled']}" for d in (
                       same, differing["before_vs_after"][scan]))]
                    for scan, same in differing["after_vs_after_qc"].items()]),
            *_made_by(part, runs, RUNS)]


def dice_section(part: dict) -> list:
    sets, d = part["sets"], (lambda v: harness.cell(v, ".4f"))
    return ["## Dice at equal settings", "",
            f"Mean Dice over the {len(part['labels'])} benchmark structures on each scan's own "
            "grid, mean over subjects; the current code with --noqc (its QC pictures are drawn "
            "after the segmentation).", "",
            *table(["set", "subjects", "before", "after", "after − before"],
                   [[n, ", ".join(f["subjects"]), d(f["before"]["mean_dice"]),
                     d(f["after"]["mean_dice"]), harness.cell(f["difference"], "+.4f")]
                    for n, f in sets.items()]), "",
            *table(["set", "subject", "before", "after", "after − before"],
                   [[n, s, d(a), d(b), "–" if None in (a, b) else f"{b - a:+.4f}"]
                    for n, f in sets.items() for s in f["subjects"]
                    for a, b in [(f["before"]["per_subject"][s], f["after"]["per_subject"][s])]]),
            "", "Segmented by:", "", *[f"- {n} {label}: `{f[label]['segmented_by']}`"
                                       for n, f in sets.items() for label in ("before", "after")]]


def memory_section(part: dict) -> list:
    runs = part["runs"]
    names = {key: f"{run['scans']} scans" for key, run in runs.items()}
    ratio, target = part["peak_rss_ratio"], part["target_ratio"]
    return ["## Memory: many scans in one process", "",
            f"The current predict.py (--noqc) on copies of {part['scan']}, each run in a fresh "
            "process.", "", *_processes(runs, names), "",
            f"Peak RSS {names['many']} / {names['few']}: **{ratio:.3f}** (target: at most "
            f"{target:.2f}: {'met' if ratio <= target else 'NOT met'}).", "",
            *table(["run", "first scan s", "warm s/scan", "slowest warm s", "last scan s"],
                   [[names[k], f"{r['first']['total']:.2f}", _s(r["warm"].get("total")),
                     _s(max(r["totals"][1:]) if r["totals"][1:] else None),
                     f"{r['totals'][-1]:.2f}"] for k, r in runs.items()]),
            *_made_by(part, runs, names)]


def refusal_section(part: dict) -> list:
    floor = part.get("import_tensorflow")
    return ["## Refusal of bad inputs", "",
            "predict.py --model_dir RUN --images BAD --output_dir OUT, as a user runs it. "
            "Seconds from start to exit; model loaded: whether any weights or graph file of the "
            "run folder was opened (strace, in a second run).", "",
            *[f"- {name}: {what}" for name, what in part["inputs"].items()], "", *table(
                ["input", "version", "exit", "seconds", "peak RSS MiB", "model loaded",
                 "stderr lines", "outputs left", "last line on stderr"],
                [[r["input"], r["version"], r["returncode"], f"{r['wall_s']:.1f}",
                  f"{r['peak_rss_mib']:.0f}", {None: "not checked", True: "yes", False: "no"}[
                      r.get("model_loaded")], r["stderr_lines"],
                  "no folder" if r["outputs_left"] is None else len(r["outputs_left"]),
                  f"`{r['message'].replace('|', '/')}`"] for r in part["runs"]]),
            *(["", f"Python importing TensorFlow and exiting (`{floor['command']}`): "
               f"{floor['wall_s']:.1f} s, {floor['peak_rss_mib']:.0f} MiB, load "
               f"{_load(floor)}."] if floor else []), *_made_by(part)]


def markdown(results: dict) -> list:
    m = results["machine"]
    lines = ["# Cohort throughput of predict.py, before and after", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, TensorFlow "
             f"{m['tensorflow']}. Every figure comes from predict.py run as a user runs it, in a "
             "fresh process, one at a time; the load average at the start and end of each run "
             "says how quiet the machine was.", ""]
    for name, section in (("stages", stages_section), ("dice", dice_section),
                          ("memory", memory_section), ("refusal", refusal_section)):
        if name in results:
            lines += [*section(results[name]), ""]
    return lines


def main(argv):
    del argv
    parts = [p for p in PARTS if p in FLAGS.parts]
    if set(FLAGS.parts) - set(PARTS):
        raise SystemExit(f"unknown parts: {', '.join(sorted(set(FLAGS.parts) - set(PARTS)))}")
    context = Context(need_before=bool({"stages", "dice", "refusal"} & set(parts)))
    try:
        path = os.path.join(FLAGS.results_dir, "cohort.json")
        results = {**harness.read_json(path, FLAGS.merge),
                   "command": context.roles(harness.command_line()),
                   "git_commit": context.current.commit, "machine": harness.machine()}
        config = harness.read_json(os.path.join(FLAGS.model_dir, "config.json"))
        provenance = {"command": results["command"], "git_commit": results["git_commit"],
                      "before_commit": context.before and context.before.commit,
                      "run_folder": {"path": "RUN", **{k: config[k] for k in (
                          "steps", "downsample", "atlas_shape")}}}
        stages = None
        for part in parts:
            figures = {"stages": stages_part, "memory": memory_part, "refusal": refusal_part,
                       "dice": lambda c: dice_part(c, stages)}[part](context)
            stages = figures if part == "stages" else stages
            results[part] = {**provenance, **json.loads(context.roles(json.dumps(figures)))}
            # after each part: a long run leaves what it has
            harness.write_results(results, markdown, os.path.join(FLAGS.results_dir, "cohort"))
    finally:
        context.close()


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
