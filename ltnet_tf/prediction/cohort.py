"""Segmenting a cohort of scan files: ``predict.py`` is a thin layer on ``predict_files``.

    lock       one writer per output folder: an existing folder's lock taken before anything is read
    sources    a trained run folder (G_F + its atlas), or atlases given as files (no network)
    checks     every scan and reference read once, before the network is loaded or anything written
    shard      this process's share of the sorted scan list (``--shard K/N``)
    per scan   ``prediction.Predictor.segment``, then the scan's files (``outputs``), its QC
               picture (``qc``), volumes, Dice, warnings; with ``--jobs N`` in N processes
               (``jobs``), each building the same predictor (``segment_share``)
    reports    volumes.csv, dice.csv/json, prediction.json, report.html (``reports``, ``report``)
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import concurrent.futures
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from absl import logging

from ltnet_tf.config import ConfigError, RefinementSettings
from ltnet_tf.io import file_warnings, volumes as data
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.prediction import determinism, jobs as jobs_lib, resumable, xla_cache
from ltnet_tf.prediction.lock import OutputLock
from ltnet_tf.preprocessing.preparation import PreparationOptions, ScanPreparation
from ltnet_tf.prediction.outputs import OutputFolder
from ltnet_tf.prediction.predictor import Predictor, check_scan
from ltnet_tf.prediction.quality import describe as describe_quality
from ltnet_tf.prediction.run_records import RunRecords, timed_load
from ltnet_tf.registration import alignment as alignment_lib
from ltnet_tf.registration.atlases import AtlasSet, atlas_files
from ltnet_tf.segmentation.segmenter import has_segmenter
from ltnet_tf.serving.modeldir import ModelDir, ModelDirError


@dataclass
class PredictOptions:
    """What ``predict.py``'s flags ask for, beyond the inputs (see its --helpfull)."""
    source: str = "auto"
    checkpoint: str = "auto"
    align: str = "auto"
    refine: bool = True
    refinement: RefinementSettings = field(default_factory=RefinementSettings)
    fusion: str = "jlf"  # measured best on both validation sets (bench/results/fusion.md)
    save_warped_atlas: bool = False
    save_flow: bool = False
    save_aligned: bool = False
    qc: bool = True
    probabilities: Optional[list] = None  # label IDs (or ["all"]) to write probability maps of
    shard: Optional[tuple] = None  # (K, N): this process segments the K-th of N shares
    segmenter: bool = True  # RUN/segmenter makes the labels if the run folder has one
    # Whole heads stripped, bias fields corrected (--skull_strip, --bias_correction).
    preparation: PreparationOptions = field(default_factory=PreparationOptions)
    similarity: str = "auto"  # another contrast mapped to the atlas's (registration.contrast)
    intensity_model: str = "auto"  # the labels finished by the scan's intensities (labelling)
    jobs: Optional[int] = None  # processes (--jobs); None: as many as cores and memory allow
    min_quality: Optional[float] = None  # flag scans expected below this Dice (None: the model's)


def shard_of(paths: list, shard) -> list:
    """The K-th of N shares of ``paths`` sorted by scan name: every N-th scan from the K-th, so
    each share is as long as the others (+-1) and the split is the same on every machine."""
    ordered = sorted(paths, key=lambda p: (data.scan_name(p), p))
    if shard is None:
        return ordered
    k, n = shard
    return ordered[k - 1::n]


def _pairs(images, labels, output: OutputFolder, shard) -> list:
    """[(scan path, reference path or None)] of this shard; references of other scans are
    ignored with one line saying how many."""
    scans = shard_of(output.scans_among(images), shard)
    if not labels:
        return [(path, None) for path in scans]
    references = {}
    for path in data.list_images(labels):
        name = data.scan_name(path)
        if name in references:
            raise data.DataError(f"{path}: same scan name '{name}' as {references[name]}")
        references[name] = path
    pairs = [(path, references.get(data.scan_name(path))) for path in scans]
    used = {reference for _, reference in pairs if reference}
    if len(references) > len(used):
        logging.info("%d reference label maps in %s are of scans not segmented here: ignored",
                     len(references) - len(used), labels)
    missing = [data.scan_name(path) for path, reference in pairs if reference is None]
    if missing:
        logging.info("no reference label map for %d scans (%s%s): segmented, left out of Dice",
                     len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    return pairs


def check_inputs(pairs, aligner: alignment_lib.AtlasAligner, align: str,
                 preparation: ScanPreparation = None):
    """Read every scan and reference once before anything is loaded or written, so a bad file
    stops the run at once with its own message; -> the first scan as read (a ``data.Volume``, or
    None without scans), for the first to be segmented (``_read_ahead``: not read twice).
    Raises DataError naming the file, ConfigError when a head is to be stripped and the
    extractor is not installed."""
    names, first = {}, None
    for image_path, label_path in pairs:
        name = data.scan_name(image_path)
        if name in names:
            raise data.DataError(f"{image_path}: same scan name '{name}' as {names[name]} (both "
                                 f"would be written to {name}_seg.nii.gz)")
        names[name] = image_path
        scan = data.load_scan(image_path)
        check_scan(scan, aligner, align, preparation)
        if label_path:
            data.check_same_grid(scan, data.load_label_map(label_path), strict=False)
        first = first or scan
    return first


def load_atlases(model_dir=None, atlas=None, atlas_labels=None) -> tuple:
    """(AtlasSet, ModelDir or None): a run folder's atlas first (if ``model_dir``), then the
    atlases given as files (``atlas``, ``atlas_labels``: paths, lists or comma-separated).
    Raises ModelDirError, DataError, ConfigError."""
    pairs = atlas_files(atlas, atlas_labels) if atlas else []
    images, label_maps = [p for p, _ in pairs], [p for _, p in pairs]
    run = None
    if model_dir:
        run = ModelDir(model_dir).check()
        run.load_config()
        kept = run.extra_atlases()  # atlases trained alongside (train.py --atlas A,B,...)
        images = [run.atlas_path, *[i for i, _ in kept], *images]
        label_maps = [run.atlas_labels_path, *[label for _, label in kept], *label_maps]
    if not images:
        raise ConfigError("give a trained run folder (--model_dir) or an atlas (--atlas and "
                          "--atlas_labels) to transfer labels from")
    return AtlasSet.load(images, label_maps), run


def load_label_names(path, run: Optional[ModelDir], label_ids) -> LabelNames:
    """The user's names (``path``), else the run folder's, else FreeSurfer's; checked against the
    atlas IDs (warnings name what is missing)."""
    if path:
        names = LabelNames.from_file(path)
    elif run is not None:
        names = run.load_label_names()
    else:
        names = LabelNames.freesurfer()
    names.check_covers(label_ids, "the atlas labels")
    return names


def load_segmenter(run: ModelDir, atlases: AtlasSet):
    """The run folder's segmenter, checked against its atlas grid and labels. Raises
    ModelDirError naming the folder."""
    from ltnet_tf.segmentation.segmenter import Segmenter, SegmenterError, segmenter_folder

    folder = segmenter_folder(run.path)
    try:
        segmenter = Segmenter.load(folder)
    except SegmenterError as e:
        raise ModelDirError(str(e)) from None
    grid = list(atlases.primary.image.shape)
    if list(segmenter.config.atlas_shape) != grid:
        raise ModelDirError(f"{folder}: segmenter made for the atlas grid "
                            f"{segmenter.config.atlas_shape}, the run's atlas is {grid}")
    return segmenter


@dataclass
class Inputs:
    """What a run reads before it segments: the atlases (``AtlasSet``) and the run folder
    (``ModelDir`` or None), the structures' names, the alignment to the primary atlas and each
    scan's preparation (brain extraction, bias correction)."""
    atlases: AtlasSet
    run: Optional[ModelDir]
    names: LabelNames
    alignment_settings: alignment_lib.AlignmentSettings
    aligner: alignment_lib.AtlasAligner
    preparation: ScanPreparation


def load_inputs(model_dir, atlas, atlas_labels, label_names, options: PredictOptions) -> Inputs:
    """The atlases, names, aligner and preparation of a run (see ``predict_files``). Raises
    DataError, ModelDirError, ConfigError."""
    atlases, run = load_atlases(model_dir, atlas, atlas_labels)
    names = load_label_names(label_names, run, atlases.label_ids)
    alignment_settings = alignment_lib.AlignmentSettings(
        registration_threads=determinism.registration_threads())
    aligner = alignment_lib.AtlasAligner(atlases.primary.image, alignment_settings)
    preparation = ScanPreparation(options.preparation, aligner.settings.min_tissue_ml)
    return Inputs(atlases, run, names, alignment_settings, aligner, preparation)


def build_run_records(inputs: Inputs, output: OutputFolder, options: PredictOptions,
                      compute: dict) -> RunRecords:
    """The model loaded (G_F, or the run folder's segmenter, or none), the ``Predictor`` made,
    and the ``RunRecords`` of the run around it. Raises ModelDirError naming the run folder."""
    run, network, segmenter = inputs.run, None, None
    if run is not None and options.segmenter and has_segmenter(run.path):
        segmenter = load_segmenter(run, inputs.atlases)  # labels by the segmenter: no G_F
    elif run is not None:
        from ltnet_tf.prediction.sources import RunFolderNetwork  # the slow part: after every check

        network = RunFolderNetwork(run.path, source=options.source, checkpoint=options.checkpoint)
    predictor = Predictor(inputs.atlases, network, align=options.align,
                          refinement=options.refinement if options.refine else None,
                          fusion_method=options.fusion,
                          alignment_settings=inputs.alignment_settings, segmenter=segmenter,
                          preparation=inputs.preparation, similarity=options.similarity,
                          intensity_model=options.intensity_model)
    run_record = RunRecords(output, predictor, inputs.names, options, run, network)
    run_record.compute = compute
    return run_record


def predict_files(images, output_dir, labels=None, *, model_dir=None, atlas=None,
                  atlas_labels=None, label_names=None, options: PredictOptions = None) -> dict:
    """Segment ``images`` (a folder, files, or comma-separated files; any grid) into
    ``output_dir`` with a trained run folder ``model_dir`` and/or atlases given as files
    (``atlas``, ``atlas_labels``; several are fused); returns {'outputs': {scan: path}, 'dice':
    dice.json's content or None, 'scans': {scan: record}}.

    Writes per scan the files listed in ``ltnet_tf.prediction.outputs`` (and ``<scan>_qc.png``),
    and for the run ``volumes.csv``, ``prediction.json``, ``report.html`` and, with reference
    label maps ``labels`` (matched by file name; others ignored), ``dice.csv``/``dice.json`` —
    with ``options.shard`` (K, N) under names marked ``.shard-K-of-N`` (``ltnet-merge`` joins
    them). Another process writing to ``output_dir`` (other than another share) is refused
    before anything is read (``lock``); every input is checked before any model is loaded, and
    nothing is written before the model is loaded and the flags agree. Scans a previous run of
    the same command finished are kept (``resumable``, ``journal``); ``options.jobs`` processes
    share the others (``jobs``).
    Raises DataError (a scan, a label map, an atlas, the output folder), ModelDirError (the run
    folder), ConfigError (flags that do not go together).
    """
    options = options or PredictOptions()
    output = OutputFolder(output_dir)
    lock = OutputLock(output.path, options.shard)
    if os.path.isdir(output.path) and os.access(output.path, os.W_OK | os.X_OK):
        lock.acquire()  # a second writer is refused at once, before anything is read
    try:
        xla_cache.keep_compiled_code()  # before TensorFlow's runtime starts (it reads the flag)
        compute = determinism.fix_threads()  # before any TensorFlow op: same scan, same bits
        pairs = _pairs(images, labels, output, options.shard)
        inputs = load_inputs(model_dir, atlas, atlas_labels, label_names, options)
        first = check_inputs(pairs, inputs.aligner, options.align, inputs.preparation)
        run_record = build_run_records(inputs, output, options, compute)  # nothing written yet
        output.prepare()
        if not lock.held:  # a folder made just now: only a run started with this one may race
            lock.acquire()
        request = ShareRequest(output.path, model_dir, atlas, atlas_labels, label_names, options,
                               file_warnings.given(), logging.get_verbosity(), compute)
        jobs = jobs_lib.Jobs(options.jobs or jobs_lib.default_jobs(
            compute["threads"] if compute["deterministic"] else None, len(inputs.atlases)),
            segment_share, request)
        read_ahead = functools.partial(_read_ahead, ready={first.path: first} if first else {})
        return resumable.run_cohort(run_record, pairs, bool(labels), read_ahead,
                                    _progress_line, jobs)
    finally:
        lock.release()


@dataclass
class ShareRequest:
    """What a job of ``--jobs N`` needs to build the predictor job 1 built (``predict_files``'s
    arguments), the warnings job 1 gave about the inputs (``file_warnings``: not given again),
    its log verbosity and its TensorFlow threads (``determinism.fix_threads``'s record: a job
    computes with job 1's pools, so its scans get job 1's bits even when job 1's TensorFlow
    had started before the prediction, as in a library caller)."""
    output_dir: str
    model_dir: Optional[str]
    atlas: object
    atlas_labels: object
    label_names: Optional[str]
    options: PredictOptions
    warnings_given: list
    verbosity: int
    compute: dict


def segment_share(request: ShareRequest, key: str, pairs: list, report) -> None:
    """Jobs 2..N of ``--jobs N`` (in their own processes): segment ``pairs`` with the model and
    settings of ``request``, records in the journal of ``key`` (job 1's: the same producer),
    ``report(name, record)`` after each scan. Raises as ``predict_files``."""
    logging.set_verbosity(request.verbosity)
    file_warnings.mark_given(request.warnings_given)
    compute = determinism.follow_threads(request.compute)
    inputs = load_inputs(request.model_dir, request.atlas, request.atlas_labels,
                         request.label_names, request.options)
    run_record = build_run_records(inputs, OutputFolder(request.output_dir), request.options,
                                   compute)
    resumable.segment_share(run_record, key, pairs, _read_ahead, report)


def _read_ahead(pairs, ready=None):
    """(scan path, reference path, the scan read, {'read': s, 'wait': s}) in order: the next scan
    is read (decompressed) in a thread while the current one is segmented, so only the wait for
    it is on the way; scans in ``ready`` ({path: Volume}, read by the checks) are not read
    again. A read error is raised at that scan's turn."""
    ready = ready or {}

    def load(path):
        return (ready.pop(path), 0.0) if path in ready else timed_load(path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = reader.submit(load, pairs[0][0]) if pairs else None
        for index, (image_path, label_path) in enumerate(pairs):
            start = time.time()
            scan, seconds = upcoming.result()
            reading = {"read": seconds, "wait": time.time() - start}
            upcoming = (reader.submit(load, pairs[index + 1][0])
                        if index + 1 < len(pairs) else None)
            yield image_path, label_path, scan, reading


def _progress_line(number: int, total: int, name: str, record: dict) -> str:
    alignment, seconds = record["alignment"], record["seconds"]
    where = "atlas grid" if alignment["skipped"] else (
        f"aligned in {alignment['seconds']:.1f} s, brain overlap {alignment['brain_overlap']:.2f}")
    if "refine" in seconds:
        where += f"; refined in {seconds['refine']:.1f} s"
    line = f"[{number}/{total}] {name}_seg.nii.gz ({where}; {seconds['total']:.1f} s)"
    if "brain_mask" in record and record["brain_mask"]:
        line += f"; brain mask {record['brain_mask']['volume_l']:.2f} L"
    quality = record.get("quality")
    if quality:
        line += f"; {describe_quality(quality)}"
    if not record["alignment_ok"]:
        line += " ALIGNMENT LOOKS WRONG: check this scan"
    if quality and quality["below_min_quality"]:
        line += f" QUALITY BELOW {quality['min_quality']:.2f}: check this scan"
    if not record.get("brain_mask_ok", True):
        line += f" BRAIN MASK LOOKS WRONG: check {name}_brainmask.nii.gz"
    if "mean_dice" in record:
        mean = record["mean_dice"]
        line += (f": mean Dice {float('nan') if mean is None else mean:.3f} over "
                 f"{len(record['dice_over'])} structures")
    return line
