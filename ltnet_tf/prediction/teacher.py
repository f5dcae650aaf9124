"""Training a segmenter from what the label transfer produces (``train.py --segmenter``).

The product's own ``Predictor`` is the teacher: it aligns each unlabelled scan to the atlas,
registers the atlas (or every atlas, fused by joint label fusion) to it, and gives

    a pseudo-labelled example    the scan with its transferred (or fused) labels
    a shape example              the primary atlas's image and labels warped by that registration

Labelled examples are the atlas itself and, with several atlases, the others. The examples go to
``segmentation.fitting``; the trained network is saved in ``RUN/segmenter/`` with its SavedModel
(``segmentation.export``). No G_F is needed: a new run folder gets the atlas (and further atlases)
and the config that predict.py reads; a run folder that holds a trained G_F lends it to the
teacher (as predict.py would use it) and keeps it.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import time

import numpy as np
from absl import logging

from ltnet_tf.config import LTNetConfig, RefinementSettings, SegmenterConfig
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction.cohort import load_atlases
from ltnet_tf.prediction.predictor import Predictor, check_scan
from ltnet_tf.preprocessing.preparation import ScanPreparation
from ltnet_tf.registration import alignment as alignment_lib, transfer
from ltnet_tf.registration.atlases import AtlasSet, atlas_files
from ltnet_tf.segmentation import synthesis
from ltnet_tf.segmentation.export import export_segmenter
from ltnet_tf.segmentation.fitting import ExampleSampler, fit
from ltnet_tf.segmentation.network import build_unet, crop_box
from ltnet_tf.segmentation.segmenter import Segmenter, has_segmenter, segmenter_folder
from ltnet_tf.serving.modeldir import ModelDir, ModelDirError


def segmenter_config(config: SegmenterConfig, atlases: AtlasSet) -> SegmenterConfig:
    """``config`` with the grid fields set from the atlases: the primary atlas's grid and brain
    box, every atlas's label IDs."""
    atlas = atlases.primary.image
    start, shape = crop_box(np.asarray(atlas.data) != 0, config)
    return config.replace(atlas_shape=list(atlas.shape), crop_start=start, crop_shape=shape,
                          label_ids=atlases.label_ids, teacher_atlases=len(atlases))


def labelled_examples(atlases: AtlasSet, config: SegmenterConfig) -> list:
    """The atlases themselves as labelled examples (labels brought onto the primary grid by
    nearest label when an atlas keeps its own grid)."""
    examples = []
    for atlas in atlases.atlases:
        labels = (atlas.labels.data if atlas.alignment is None
                  else atlas.alignment.resample_labels(atlas.labels).data)
        examples.append(synthesis.working_example(atlas.name, "labelled", atlas.image.data,
                                                  labels, config))
    return examples


def teacher_examples(predictor: Predictor, scan_paths: list, config: SegmenterConfig,
                     log=print, preparation: ScanPreparation = None) -> tuple:
    """(pseudo-labelled examples, shape examples, records) of ``scan_paths`` (any grid), from the
    product's registrations; ``preparation`` strips and corrects whole heads first. Raises
    DataError naming a scan that cannot be used."""
    atlas_labels = predictor.atlases.primary.labels.data
    pseudo, shapes, records = [], [], []
    for number, path in enumerate(scan_paths, start=1):
        start = time.time()
        scan = data.load_scan(path)
        if preparation is not None:  # a whole head: stripped and corrected first
            scan = preparation(scan).scan
        # Aligned first, so that the labels are pulled once, onto the atlas grid only.
        alignment = (predictor.aligner.align(scan) if predictor.needs_alignment(scan)
                     else alignment_lib.identity(predictor.atlas, scan))
        aligned = alignment.resample_scan(scan)
        result = predictor.segment(aligned, extras=True)
        name = data.scan_name(path)
        pseudo.append(synthesis.working_example(name, "pseudo", aligned.data,
                                                result["segmentation"], config))
        warped_labels = transfer.warp_labels(atlas_labels, result["flow"][None])[0].numpy()
        shapes.append(synthesis.working_example(f"atlas to {name}", "shape",
                                                result["warped_atlas"][..., 0], warped_labels,
                                                config, normalised=True))
        records.append({"scan": name, "aligned": not alignment.skipped,
                        "alignment_ok": bool(alignment.ok),
                        "seconds": round(time.time() - start, 2)})
        if not alignment.ok:
            logging.warning("%s: alignment to the atlas looks wrong (%s); its examples are kept "
                            "but may teach wrong labels", path, alignment.diagnosis)
        log(f"[{number}/{len(scan_paths)}] {name}: pseudo-labels and a shape example "
            f"({time.time() - start:.1f} s)")
    return pseudo, shapes, records


def _run_folder(model_dir: str, atlas, atlas_labels) -> tuple:
    """(ModelDir, AtlasSet, RunFolderNetwork or None): an existing run's atlases and G_F, or a
    new run folder made for the given atlases. Raises ModelDirError, DataError, ConfigError."""
    run = ModelDir(model_dir)
    if os.path.isfile(run.config_path):
        if atlas:
            raise ModelDirError(f"{run.path}: already a run folder with its own atlas; train its "
                                f"segmenter without --atlas, or choose a new --model_dir")
        atlases, run = load_atlases(run.path)
        network = None
        if run.latest_saved_model() or os.path.isdir(run.checkpoint_dir):
            from ltnet_tf.prediction.sources import RunFolderNetwork

            network = RunFolderNetwork(run.path)
        return run, atlases, network
    pairs = atlas_files(atlas, atlas_labels)
    atlases = AtlasSet.load([p for p, _ in pairs], [q for _, q in pairs])
    primary = atlases.primary
    config = LTNetConfig().replace(atlas_shape=list(primary.image.shape),
                                   label_ids=[0, *sorted(int(i) for i in np.unique(
                                       primary.labels.data) if i != 0)])
    run.create(config, primary.image, primary.labels)
    if len(pairs) > 1:
        run.keep_atlases(pairs[1:])
    return run, atlases, None


def _check_scans(scan_paths: list, pairs: list, preparation: ScanPreparation = None) -> None:
    """Every unlabelled scan read and checked against the new atlases ``pairs`` [(image,
    labels)] before anything is written; none may be an atlas. Raises DataError naming it."""
    if not pairs:
        return
    aligner = alignment_lib.AtlasAligner(data.load_scan(pairs[0][0]))
    atlas_files_used = {os.path.abspath(p) for pair in pairs for p in pair}
    for path in scan_paths:
        if os.path.abspath(path) in atlas_files_used:
            raise data.DataError(f"{path}: is also an atlas; an unlabelled scan must not be")
        check_scan(data.load_scan(path), aligner, "auto", preparation)


def train_segmenter(model_dir: str, unlabeled, config: SegmenterConfig, *, atlas=None,
                    atlas_labels=None, fusion: str = "jlf", refinement: RefinementSettings = None,
                    export: bool = True, preparation: ScanPreparation = None,
                    log=print) -> Segmenter:
    """Make the examples with the product's label transfer and fit a segmenter on them; saved in
    ``model_dir``/segmenter/ (and its SavedModel, with ``export``). ``atlas``/``atlas_labels``:
    for a new run folder (comma-separated for several atlases, fused by ``fusion``); an existing
    run folder uses its own. ``preparation``: whole heads among the scans are stripped and
    N4-corrected first, as predict.py does. Every scan is read and checked before anything is
    written.
    Raises DataError (a scan or atlas), ModelDirError (the folder), ConfigError, and
    fitting.SegmenterTrainingError."""
    scan_paths = data.list_images(unlabeled)
    if os.path.isdir(os.path.join(model_dir, "segmenter")) and has_segmenter(model_dir):
        raise ModelDirError(f"{os.path.abspath(model_dir)}: already holds a segmenter "
                            f"(segmenter/); choose another --model_dir")
    _check_scans(scan_paths, atlas_files(atlas, atlas_labels) if atlas else [], preparation)
    start = time.time()
    run, atlases, network = _run_folder(model_dir, atlas, atlas_labels)
    config = segmenter_config(config.replace(teacher_fusion=fusion if len(atlases) > 1
                                             else None), atlases)
    predictor = Predictor(atlases, network, refinement=refinement or RefinementSettings(),
                          fusion_method=fusion)
    log(f"teacher: {len(atlases)} atlas(es)" + (f" fused by {fusion}" if len(atlases) > 1 else "")
        + f", {'G_F of the run' if network else 'refinement from the identity'}; "
        f"{len(scan_paths)} unlabelled scans")
    real = labelled_examples(atlases, config)
    pseudo, shapes, records = teacher_examples(predictor, scan_paths, config, log, preparation)
    teacher_minutes = (time.time() - start) / 60.0
    teacher_start = "G_F of the run" if network is not None else "identity"
    intensity_model = predictor.intensity_model_record()  # the pseudo-labels were finished by it
    del predictor, network  # memory for the fitting
    shape_statistics = synthesis.appearance_statistics(real[0].image, real[0].fractions)
    sampler = ExampleSampler(real + pseudo, shapes, shape_statistics, config)
    model = build_unet(config)
    log(f"segmenter: U-Net {config.features} on {list(config.working_shape)} (brain box "
        f"{config.crop_shape} at {config.crop_start}, / {config.downsample}), "
        f"{len(config.label_ids)} labels, {model.count_params():,} weights; examples: "
        f"{len(real)} labelled, {len(pseudo)} pseudo-labelled, {len(shapes)} shapes; "
        f"synthesised share {config.synth_fraction}")
    fitted = fit(model, sampler, config, log)
    training = {"teacher": {"atlases": [a.name for a in atlases.atlases],
                            "fusion": config.teacher_fusion,
                            "start": teacher_start,
                            "refinement": (refinement or RefinementSettings()).to_dict(),
                            "intensity_model": intensity_model,
                            "scans": records, "minutes": teacher_minutes},
                "examples": {"labelled": [e.name for e in real],
                             "pseudo": [e.name for e in pseudo],
                             "shapes": [e.name for e in shapes]},
                "fit": fitted, "train_minutes": (time.time() - start) / 60.0}
    segmenter = Segmenter(config, model, training)
    folder = segmenter.save(segmenter_folder(run.path))
    if export:
        export_segmenter(segmenter, folder)
    log(f"segmenter written to {folder} ({training['train_minutes']:.1f} min: teacher "
        f"{teacher_minutes:.1f}, fitting {fitted['minutes']:.1f})")
    return segmenter
