"""What every benchmark shares: the data and its validation sets, provenance (the command as anyone
reruns it, the commit), timing, results files written whole, markdown tables, and the product's
segmenter (``Product``: ``ltnet_tf.prediction.Predictor`` as predict.py runs it). Results never name
a folder of one machine: the data folder is ``$LTNET_DATA_DIR``, the repository ``.``, others their
role (``RUN``, ``WORK``). Importing this loads no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the repository (see its README), or $LTNET_DATA_DIR.
DATA_DIR = os.environ.get("LTNET_DATA_DIR") or os.path.normpath(
    os.path.join(ROOT, "..", "shared", "data"))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
SHARED_SUBJECTS = ("sub-06", "sub-07")
MICCAI_SUBJECTS = ("1000", "1001", "1002", "1006", "1007", "1008")  # never trained on


# ------------------------------------------------------------------------------- provenance
def define_flags(name: str, work: bool = True, merge: bool = False) -> None:
    """The flags every benchmark takes: --data_dir, --results_dir, (``work``) --work_dir (default
    bench/scratch/``name``) and (``merge``) --merge."""
    from absl import flags
    flags.DEFINE_string("data_dir", DATA_DIR, "Benchmark data (default: $LTNET_DATA_DIR, else "
                        "../shared/data beside the repository).")
    flags.DEFINE_string("results_dir", RESULTS_DIR, "Where results go.")
    if work:
        flags.DEFINE_string("work_dir", os.path.join(ROOT, "bench", "scratch", name),
                            "Scratch: inputs, segmentations, logs.")
    if merge:
        flags.DEFINE_bool("merge", True, f"Keep what an existing {name}.json holds and this run "
                          "does not rerun (each entry records its own command and commit).")


def portable(text, roles: dict = None) -> str:
    """``text`` with this machine's paths replaced: folders of ``roles`` ({path: role}) by their
    role, the data folder by $LTNET_DATA_DIR, the repository by a relative
    path. The longest path first: one folder may hold another."""
    text = str(text)
    named = {os.path.abspath(p): r for p, r in (roles or {}).items() if p}
    named[os.path.abspath(DATA_DIR)] = "$LTNET_DATA_DIR"
    for path in sorted(named, key=len, reverse=True):
        text = text.replace(path, named[path])
    return text.replace(ROOT + os.sep, "").replace(ROOT, ".")


def command_line(roles: dict = None) -> str:
    """``python -m bench.<name> <arguments>`` of the running benchmark, portable; an argument (or
    a flag's value after '=') naming a folder of ``roles`` as given is replaced by its role."""
    module = os.path.splitext(os.path.relpath(os.path.abspath(sys.argv[0]), ROOT))[0]
    given = {p.rstrip(os.sep): r for p, r in (roles or {}).items() if p}

    def named(arg: str) -> str:
        flag, equals, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        return flag + equals + given.get(value.rstrip(os.sep), value)

    return portable(" ".join(["python", "-m", module.replace(os.sep, "."),
                              *map(named, sys.argv[1:])]), roles)


def git_commit() -> str:
    """HEAD, with '-dirty' when tracked files other than bench/results/ differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """The CPU, its core count, Python and TensorFlow versions (without importing TensorFlow)."""
    with open("/proc/cpuinfo") as f:  # Linux
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.machine())
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": importlib.metadata.version("tensorflow")}


def machine_line() -> str:
    """'x86_64, 2 CPUs, TF 2.21.0, GPU: False' (imports TensorFlow)."""
    import tensorflow as tf
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"TF {tf.__version__}, GPU: {bool(tf.config.list_physical_devices('GPU'))}")


# ------------------------------------------------------------------------------- results files
def read_json(path: str, merge: bool = True) -> dict:
    """An earlier results file ({} when absent or ``merge`` is off)."""
    if merge and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def write_json(payload: dict, path: str) -> None:
    """A results file, written under a temporary name and renamed: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_markdown([json.dumps(payload, indent=2)], path)


def write_results(payload: dict, markdown, stem: str) -> None:
    """``stem``.json holding ``payload`` and ``stem``.md of ``markdown(payload)`` (its lines)."""
    write_json(payload, stem + ".json")
    write_markdown(markdown(payload), stem + ".md")


def write_markdown(lines: list, path: str, echo: bool = False) -> None:
    from ltnet_tf.files import atomic_write
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines) if echo else f"wrote {portable(path)}", flush=True)


def table(header: list, rows: list) -> list:
    """A markdown table's lines: ``header`` cells, then one row of cells per row."""
    return (["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def cell(value, form: str) -> str:
    return "–" if value is None else format(value, form)


def per_structure(entries: dict) -> list:
    """The table of Dice per structure (28) of ``entries`` {column: {'per_structure'}}."""
    from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name
    names = [structure_name(label) for label in BENCHMARK_LABELS]
    return table(["structure", *entries], [[n, *(f"{e['per_structure'][n]:.3f}" for e in
                                                 entries.values())] for n in names])


def per_subject(entries: dict, subjects) -> list:
    """The table of Dice / seconds per subject of ``entries`` {column: {'per_subject',
    'per_subject_seconds'}} ('–' where a column has no such subject)."""
    return table(["subject", *entries], [[s, *(
        f"{e['per_subject'][s]:.3f} / {e['per_subject_seconds'][s]:.1f} s"
        if s in e["per_subject"] else "–" for e in entries.values())] for s in subjects])


# ------------------------------------------------------------------------------- validation sets
@dataclasses.dataclass(frozen=True)
class Case:
    """One validation scan and its reference labels, both on the atlas grid."""
    set_name: str
    subject: str
    image_path: str
    label_path: str

    def output(self, work_dir: str, method: str) -> str:
        """Where ``method``'s segmentation of this scan goes."""
        return os.path.join(work_dir, "segmentations", method, self.set_name,
                            f"{self.subject}_seg.nii.gz")


SET_NOTES = {
    "shared": "FreeSurfer aseg labels (the atlas's protocol), aligned to the atlas by the data's "
              "provider.",
    "miccai2012": "Manual Neuromorphometrics labels mapped to FreeSurfer IDs (another protocol: "
                  "compares methods, not absolute accuracy); each scan aligned affinely to the "
                  "atlas once by ltnet_tf.registration.alignment, labels by nearest label; every "
                  "method reads these."}


def validation_sets(data_dir: str, work_dir: str, sets, subjects=None) -> tuple:
    """(cases, {set: {'subjects', 'note'[, 'alignment']}}) of ``sets`` ('shared': sub-06/07 of
    the data, on the atlas grid; 'miccai2012': MICCAI 2012 subjects aligned once to the atlas and
    cached in ``work_dir``), restricted to ``subjects`` when given (empty sets are left out)."""
    cases, info = [], {}
    for name in sets:
        wanted = [s for s in (SHARED_SUBJECTS if name == "shared" else MICCAI_SUBJECTS)
                  if subjects is None or s in subjects]
        if not wanted:
            print(f"set {name}: no subject of --subjects in it; left out", flush=True)
            continue
        info[name] = {"subjects": wanted, "note": SET_NOTES[name]}
        if name == "shared":
            cases += [Case(name, s, os.path.join(data_dir, "images", f"{s}.nii.gz"),
                           os.path.join(data_dir, "labels", f"{s}.nii.gz")) for s in wanted]
        else:
            found, info[name]["alignment"] = miccai_cases(
                data_dir, os.path.join(work_dir, "miccai2012_aligned"), wanted)
            cases += found
    return cases, info


def miccai_cases(data_dir: str, cache_dir: str, subjects) -> tuple:
    """MICCAI 2012 subjects aligned to the atlas (``ltnet_tf.registration.alignment``) and cached
    as NIfTI on its grid; remade when alignment.py changes. -> (cases, manifest)."""
    from ltnet_tf.io import volumes
    from ltnet_tf.registration import alignment

    manifest_path, source = os.path.join(cache_dir, "alignment.json"), os.path.join(
        data_dir, "miccai2012")
    code_hash = subprocess.run(["git", "hash-object", alignment.__file__], capture_output=True,
                               text=True, check=True).stdout.strip()
    manifest = read_json(manifest_path)
    if manifest.get("alignment_source_hash") != code_hash:
        manifest = {"alignment_source_hash": code_hash, "subjects": {}}
    aligner, cases = None, []
    for subject in subjects:
        paths = [os.path.join(cache_dir, k, f"{subject}.nii.gz") for k in ("images", "labels")]
        if subject not in manifest["subjects"] or not all(map(os.path.isfile, paths)):
            aligner = aligner or alignment.AtlasAligner(
                volumes.load_scan(os.path.join(data_dir, "atlas.nii.gz")))
            start = time.time()
            scan = volumes.load_scan(os.path.join(source, "images", f"{subject}.nii.gz"))
            found = aligner.align(scan)
            aligned, labels = found.resample_scan(scan), found.resample_labels(
                volumes.load_label_map(os.path.join(source, "labels", f"{subject}.nii.gz")))
            volumes.save_nifti(aligned.data, aligned.affine, paths[0], dtype="float32")
            volumes.save_nifti(labels.data, labels.affine, paths[1])
            manifest["settings"] = aligner.settings.to_dict()
            manifest["subjects"][subject] = {"seconds_with_resampling": round(
                time.time() - start, 2), **found.to_dict()}
            write_json(manifest, manifest_path)
        cases.append(Case("miccai2012", subject, *paths))
    return cases, manifest


def atlas_pairs(data_dir: str, extras) -> list:
    """[(image, label map)]: the data's atlas, then the subjects ``extras`` of images/ and labels/
    as further atlases; SystemExit if one is a validation subject, listed twice or missing."""
    if set(extras) & set(SHARED_SUBJECTS) or len(set(extras)) != len(extras):
        raise SystemExit("extra atlases: validation subjects can never be atlases, and each is "
                         "listed once")
    pairs = [(os.path.join(data_dir, "atlas.nii.gz"),
              os.path.join(data_dir, "atlas_labels.nii.gz"))]
    pairs += [(os.path.join(data_dir, "images", f"{s}.nii.gz"),
               os.path.join(data_dir, "labels", f"{s}.nii.gz")) for s in extras]
    for path in (p for pair in pairs for p in pair if not os.path.isfile(p)):
        raise SystemExit(f"{path}: atlas file not found")
    return pairs


def provenance(roles: dict = None) -> dict:
    """{'command', 'git_commit', 'load_average_1_5_15min': {'start'}} of this run (the machine is
    shared: the load at the start, and at the end when the caller adds it, say how busy it was)."""
    return {"command": command_line(roles), "git_commit": git_commit(),
            "load_average_1_5_15min": {"start": os.getloadavg()}}


def dice_figures(records: list, folding: bool = True) -> dict:
    """Figures of one configuration on one set from per-scan records ({'subject', 'dice' {label:
    Dice}, 'seconds'[, 'folding_fraction']}): means, per subject and per structure (28)."""
    import numpy as np
    from ltnet_tf.io import evaluation
    from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

    subjects = {r["subject"]: evaluation.mean_dice(r["dice"], BENCHMARK_LABELS) for r in records}
    figures = {"mean_dice": float(np.mean(list(subjects.values()))), "per_subject": subjects,
               "per_structure": {structure_name(label): float(np.nanmean(
                   [r["dice"][label] for r in records])) for label in BENCHMARK_LABELS},
               "seconds_per_scan": float(np.mean([r["seconds"] for r in records])),
               "per_subject_seconds": {r["subject"]: r["seconds"] for r in records}}
    if folding:
        figures.update(
            folding_fraction=float(np.mean([r["folding_fraction"] for r in records])),
            per_subject_folding={r["subject"]: r["folding_fraction"] for r in records})
    return figures


def score(case: Case, result: dict, name: str) -> dict:
    """One scan's record from a segmenter's result: Dice of the 28 structures, seconds, folding."""
    from ltnet_tf.io import evaluation, volumes
    from ltnet_tf.io.labels import BENCHMARK_LABELS

    reference = volumes.load_label_map(case.label_path).data
    dice = evaluation.dice_per_label(result["segmentation"], reference, BENCHMARK_LABELS)
    stages = result.get("stage_seconds") or result.get("seconds_parts") or {}
    print(f"[{name}] {case.set_name} {case.subject}: Dice "
          f"{evaluation.mean_dice(dice, BENCHMARK_LABELS):.3f}, {result['seconds']:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + ")", flush=True)
    return {"set": case.set_name, "subject": case.subject, "dice": dice, "stages": stages,
            "seconds": result["seconds"], "folding_fraction": result.get("folding_fraction"),
            "folding_fractions": result.get("folding_fractions"),
            "refine_seconds": stages.get("refine"),
            "refinement_loss": result.get("refinement_loss")}


# ------------------------------------------------------------------------------- segmenters
class Product:
    """The product's per-scan pipeline (``ltnet_tf.prediction.Predictor``) on a scan file, timed
    end to end (read, segment, write): a run folder's G_F (``model_dir``) or none (identity
    start), refined with ``refinement`` (a ``RefinementSettings``) or not, one atlas or several
    (``atlases`` [(image, labels)], fused by ``fusion``), the labels finished by the per-scan
    intensity model or not (``intensity_model``: 'auto' or 'off', predict.py's flag); or with
    ``segmenter`` the run folder's trained segmenter (train.py --segmenter) instead of its G_F.
    Tracing is paid untimed at load."""

    def __init__(self, model_dir: str = None, refinement=None, atlases=None, fusion="jlf",
                 segmenter: bool = False, intensity_model: str = "auto"):
        from ltnet_tf.prediction import Predictor, cohort, sources

        start = time.time()
        atlas_set, run = cohort.load_atlases(
            model_dir, [p for p, _ in atlases or []] or None, [p for _, p in atlases or []] or None)
        network = None if model_dir is None or segmenter else sources.RunFolderNetwork(model_dir)
        self.segmenter = cohort.load_segmenter(run, atlas_set) if segmenter else None
        self.predictor = Predictor(atlas_set, network, refinement=refinement, fusion_method=fusion,
                                   segmenter=self.segmenter, intensity_model=intensity_model)
        self.checkpoint = None if network is None else network.source
        r = refinement
        if segmenter:
            training = self.segmenter.training
            self.train_minutes = training.get("train_minutes")
            self.description = (f"segmenter of a run folder ({len(atlas_set)} teacher atlas(es), "
                                f"{training.get('fit', {}).get('steps')} steps, "
                                f"{self.train_minutes:.1f} min of training)")
        else:
            self.description = (("no network (identity start)" if network is None else f"G_F of "
                                 f"a run folder ({os.path.basename(network.source)})") + (
                ", network alone" if r is None else f", refined {r.coarse_steps} steps at grid / "
                f"{r.coarse_factor or 'working'}, then {r.steps} at / {r.factor}") + (
                f"; {len(atlas_set)} atlases fused by {fusion}" if len(atlas_set) > 1 else "")
                + ("; labels finished by the intensity model"
                   if self.predictor.intensity_model is not None else ""))
        self.predictor.segment(atlas_set.primary.image)  # tracing, once per process
        self.load_seconds = time.time() - start

    def segment(self, image_path: str, output_path: str) -> dict:
        from ltnet_tf.io import evaluation, volumes
        from ltnet_tf.registration.transfer import Displacement

        start = time.time()
        scan = volumes.load_scan(image_path)
        result = self.predictor.segment(scan)
        volumes.save_nifti(result["segmentation"], scan.affine, output_path, header=scan.header)
        seconds = time.time() - start
        if self.segmenter is not None:  # no displacement to fold
            return {"segmentation": result["segmentation"], "seconds": seconds,
                    "stage_seconds": dict(result["seconds"])}
        model = result.get("intensity_model")
        displacement = result["displacement"]
        if displacement is None:  # the network alone segmented in one call: its displacement
            network = self.predictor.network
            displacement = Displacement([(network.working_displacement(scan)[None],
                                          network.config.downsample)])
        flow = displacement.full_grid(scan.shape)[0].numpy()
        refinement = result.get("refinement")
        return {"segmentation": result["segmentation"], "seconds": seconds,
                "stage_seconds": dict(result["seconds"]),
                "folding_fraction": evaluation.folding_fraction(flow, scan.data > 0),
                "intensity_model": None if model is None else {
                    k: v for k, v in model.items() if k != "gaussians"},
                **({"refinement_loss": {"loss_start": refinement["loss_start"][0],
                                        "loss": refinement["loss"][0]}} if refinement else {})}
