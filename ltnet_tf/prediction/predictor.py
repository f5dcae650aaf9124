"""The per-scan pipeline of prediction: a scan on any grid -> its segmentation on that grid.

    check     the scan is a plausible skull-stripped brain (or on the atlas grid),  alignment.py
              or a whole head to strip                                              preparation.py
    prepare   a head's brain extracted (its mask checked), N4 bias correction       preparation.py
    align     rigid + affine to the (primary) atlas, unless on its grid already      alignment.py
    network   G_F's displacement on its working grid, if a trained network is used  sources.py
    refine    Adam on the displacement of every atlas, coarse to fine, batched      refinement.py
    pull      each atlas's labels onto the scan's own voxels, one interpolation,    native.py
              fused across atlases (majority or locally weighted voting, JLF)       fusion.py
    finish    a Gaussian per structure fitted by EM to the scan on the transfer's   labelling/
              prior: the scan's own intensities settle the boundaries
    quality   the expected Dice per structure and scan, from the evidence the      quality.py
              transfer left (no reference needed)

``Predictor`` is usable on its own (one ``data.Volume`` at a time);
``ltnet_tf.prediction.cohort.predict_files`` runs it over files and writes the outputs.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import contextlib
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from ltnet_tf.config import ConfigError, RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.preprocessing.preparation import ScanPreparation
from ltnet_tf.io import intensity
from ltnet_tf.io.headers import voxel_sizes
from ltnet_tf.labelling.intensity_model import IntensityModel, MODES as INTENSITY_MODES
from ltnet_tf.registration import alignment as alignment_lib, contrast, transfer as inference
from ltnet_tf.registration.atlases import AtlasSet
from ltnet_tf.registration.native import NativeLabelPull, brain_mask, pull_fused
from ltnet_tf.registration.refinement import ScanRefiner
from ltnet_tf.prediction.quality import QualityEstimator
from ltnet_tf.prediction.quality_evidence import TransferEvidence

FUSION_METHODS = ("majority", "local", "jlf")


def check_scan(scan: data.Volume, aligner: alignment_lib.AtlasAligner, align: str,
               preparation: ScanPreparation = None) -> None:
    """Cheap checks before anything is written: the grid (without alignment) or the brain's
    plausibility (with it; ``aligner``: of the primary atlas), or for a scan ``preparation``
    will strip, a head's (and that the extractor loads). Raises DataError naming the scan,
    ConfigError when the extractor is not installed."""
    atlas = aligner.atlas
    stripped = preparation is not None and preparation.check(scan)
    if align == "auto" and not alignment_lib.on_atlas_grid(atlas, scan):
        if not stripped:
            aligner.check_brain(scan)
    elif tuple(scan.shape) != tuple(atlas.shape):
        raise data.DataError(f"{scan.path}: shape {tuple(scan.shape)} differs from the atlas "
                             f"grid {tuple(atlas.shape)} (use --align auto to align scans on "
                             f"other grids)")


class StageClock:
    """Wall and CPU seconds (the process's, all threads: what the stage costs the machine) of named
    stages: ``with clock("align"): ...`` -> ``seconds`` and ``cpu_seconds`` {stage: s}."""

    def __init__(self):
        self.seconds, self.cpu_seconds = {}, {}

    @staticmethod
    def _cpu() -> float:
        times = os.times()
        return times.user + times.system

    @contextlib.contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.time(), self._cpu()
        yield
        self.seconds[stage] = time.time() - wall
        self.cpu_seconds[stage] = self._cpu() - cpu


class Predictor:
    """Scans on any grid -> segmentations on their own grids.

    ``atlases``: an ``atlases.AtlasSet`` (one atlas, or several to fuse); ``network``: a
    ``sources.RunFolderNetwork`` whose G_F starts the primary atlas's registration, or None
    (every registration starts from the identity); ``refinement``: ``config.RefinementSettings``
    or None (the network alone: needs a network and one atlas); ``fusion``: how several atlases'
    labels are fused (``FUSION_METHODS``); ``segmenter``: a trained
    ``segmentation.segmenter.Segmenter`` that makes the labels instead of the label transfer
    (alignment and the scan's own grid as without it; no registration, network or refinement);
    ``preparation``: a ``ScanPreparation`` (brain extraction, bias correction) or None (scans
    used as they are); ``intensity_model``: 'auto' (the transferred labels finished by the
    per-scan intensity model, ``labelling.intensity_model``, with its measured defaults), 'off',
    or ``IntensityModelSettings``; a segmenter's labels are its own. Raises ConfigError for an
    impossible combination.
    """

    def __init__(self, atlases: AtlasSet, network=None, *, align: str = "auto",
                 refinement: RefinementSettings = None, fusion_method: str = "jlf",
                 alignment_settings: alignment_lib.AlignmentSettings = None, segmenter=None,
                 preparation: ScanPreparation = None, similarity: str = "auto",
                 intensity_model="auto"):
        if align not in ("auto", "never"):
            raise ValueError(f"align must be auto or never, got {align!r}")
        if fusion_method not in FUSION_METHODS:
            raise ConfigError(f"--fusion must be one of {', '.join(FUSION_METHODS)}, got "
                              f"{fusion_method!r}")
        self.segmenter = segmenter
        if segmenter is not None:
            network, refinement = None, None
        elif refinement is None and (network is None or len(atlases) > 1):
            raise ConfigError("refinement cannot be switched off "
                              + ("without a trained network: it is what registers the atlas"
                                 if network is None else "with several atlases: the network "
                                 "registers the primary atlas only"))
        self.atlases, self.network = atlases, network
        self.atlas = atlases.primary.image
        self.config = None if network is None else network.config
        self.align_mode, self.fusion_method = align, fusion_method
        self.preparation = preparation
        if similarity not in contrast.SIMILARITIES:
            raise ConfigError(f"--similarity must be one of {', '.join(contrast.SIMILARITIES)}, "
                              f"got {similarity!r}")
        self.similarity = similarity
        if isinstance(intensity_model, str) and intensity_model not in INTENSITY_MODES:
            raise ConfigError(f"--intensity_model must be one of {', '.join(INTENSITY_MODES)}, "
                              f"got {intensity_model!r}")
        self.intensity_model = None if intensity_model == "off" or segmenter is not None else (
            IntensityModel(None if intensity_model == "auto" else intensity_model))
        self._atlas_normalized = None
        self.aligner = alignment_lib.AtlasAligner(
            self.atlas, alignment_settings or alignment_lib.AlignmentSettings())
        self.pulls = [NativeLabelPull(a.labels.data, a.labels_from_grid) for a in atlases.atlases]
        self.refiner = (None if refinement is None else
                        ScanRefiner(self.config, atlases.images_on_grid(), refinement))
        # The expected Dice (``quality``) needs the refinement's outputs.
        self.quality = (None if self.refiner is None else
                        QualityEstimator(atlases, self.refiner.refinement.factor))

    @property
    def label_ids(self) -> list:
        return self.atlases.label_ids

    def refinement_record(self):
        """The refinement's settings for prediction.json, or None without refinement."""
        return None if self.refiner is None else self.refiner.settings()

    def intensity_model_record(self):
        """The intensity model's settings for prediction.json, or None when it is off."""
        return None if self.intensity_model is None else self.intensity_model.settings.to_dict()

    def needs_alignment(self, scan: data.Volume) -> bool:
        return self.align_mode == "auto" and not alignment_lib.on_atlas_grid(self.atlas, scan)

    def check(self, scan: data.Volume) -> None:
        check_scan(scan, self.aligner, self.align_mode, self.preparation)

    # ------------------------------------------------------------------ one scan
    def segment(self, scan: data.Volume, *, keep_aligned: bool = False, extras: bool = False,
                probabilities=None) -> dict:
        """One scan -> {'segmentation' [scan grid] label IDs, 'alignment', 'seconds' {stage: s},
        'refinement' ({'loss_start', 'loss'} per atlas, or None), 'displacement' (an
        ``inference.Displacement`` per atlas, on the atlas grid; None when the network segmented
        in one call)}, with ``keep_aligned`` also
        'aligned_scan', 'aligned_segmentation' (atlas grid), with ``extras`` the primary atlas's
        'flow' [D, H, W, 3] and 'warped_atlas' [D, H, W, 1] (atlas grid); with ``probabilities``
        (label IDs) 'probabilities' [L, *scan grid] uint8 (x 255), each label's fused share;
        'cpu_seconds' {stage: s} is the CPU time of each stage of 'seconds'; 'prepared' the
        ``preparation.PreparedScan`` (its brain mask, N4's record) or None without preparation;
        'intensity_model' what the intensity model did (``IntensityResult.record``; None when
        it is off); 'quality' the expected Dice and its evidence (``quality.QualityEstimator``;
        None without refinement). With the model on, 'probabilities' are its posterior."""
        clock = StageClock()
        prepared, scan = self._prepare(scan, clock)
        alignment, aligned_scan, aligned, similarity = self._align(scan, prepared, clock)
        result = {"alignment": alignment, "seconds": clock.seconds, "prepared": prepared,
                  "similarity": similarity,
                  "cpu_seconds": clock.cpu_seconds, "refinement": None, "displacement": None,
                  "intensity_model": None, "quality": None}
        if self.segmenter is not None:
            result.update(self._segmenter_labels(scan, alignment, aligned, clock, keep_aligned,
                                                 probabilities))
        elif alignment.skipped and self.refiner is None and not (keep_aligned or probabilities):
            with clock("network_and_labels"):  # network and label warp in one call (one graph)
                result.update(self.network.segment(aligned, extras=extras))
            if self.intensity_model is not None:
                with clock("intensity_model"):
                    fitted = self._finish(scan, brain_mask(scan.data), result["segmentation"])
                result.update(segmentation=fitted.labels, intensity_model=fitted.record)
        else:
            result.update(self._transferred_labels(scan, alignment, aligned, aligned_scan, clock,
                                                   keep_aligned, extras, probabilities))
        return result

    def _prepare(self, scan: data.Volume, clock: StageClock) -> tuple:
        """(the ``PreparedScan`` or None, the scan to segment: stripped and corrected if asked)."""
        if self.preparation is None:
            return None, scan
        with clock("prepare"):
            prepared = self.preparation(scan)
        mask = prepared.brain_mask
        if mask is not None and not mask.ok:
            logging.warning("%s", mask.describe(scan.path))
        return prepared, prepared.scan

    def _align(self, scan: data.Volume, prepared, clock: StageClock) -> tuple:
        """(alignment, the scan on the atlas grid, the same in the atlas's contrast when the
        similarity is 'remap', the similarity used)."""
        with clock("align"):
            # A stripped scan's size was checked on its mask (flagged, not refused, if wrong).
            stripped = prepared is not None and prepared.brain_mask is not None
            alignment = (self.aligner.align(scan, check_size=not stripped)
                         if self.needs_alignment(scan)
                         else alignment_lib.identity(self.atlas, scan))
            aligned_scan = alignment.resample_scan(scan)
        similarity, aligned = self._similarity(alignment), aligned_scan
        if similarity == "remap":
            with clock("contrast"):
                aligned = self._atlas_like(aligned_scan)
        return alignment, aligned_scan, aligned, similarity

    def _transferred_labels(self, scan, alignment, aligned, aligned_scan, clock, keep_aligned,
                            extras, probabilities) -> dict:
        """The label transfer (``segment`` without a segmenter): displacement(s), refinement,
        labels pulled onto the scan's own voxels and fused."""
        result = {}
        displacement, refined = self._displacement(aligned, clock)
        result["displacement"] = displacement
        with clock("labels"):
            weights = self._fusion_weights(aligned, refined)
            native_to_grid = (np.eye(4) if alignment.skipped
                              else alignment.scan_voxel_to_atlas_voxel)
            mask = brain_mask(scan.data)
            labels, shares, votes = self._labels(displacement, native_to_grid, scan.shape,
                                                 weights, mask, probabilities)
        transferred = labels
        if self.intensity_model is not None:
            with clock("intensity_model"):
                fitted = self._finish(scan, mask, labels, votes, probabilities)
            labels, shares = fitted.labels, fitted.probabilities
            result["intensity_model"] = fitted.record
        if self.quality is not None:
            with clock("quality"):
                result["quality"] = self.quality(TransferEvidence(
                    scan.affine, alignment, self._similarity(alignment), refined, displacement,
                    transferred, labels, result.get("intensity_model")))
        result["segmentation"] = labels
        if probabilities:
            result["probabilities"] = shares
        if refined is not None:
            result["refinement"] = {"loss_start": refined["loss_start"].tolist(),
                                    "loss": refined["loss"].tolist()}
        if keep_aligned:
            atlas_grid = labels
            if not alignment.skipped:
                grid_mask = brain_mask(aligned_scan.data)
                atlas_grid, _, votes = self._labels(displacement, np.eye(4), self.atlas.shape,
                                                    weights, grid_mask)
                if self.intensity_model is not None:
                    atlas_grid = self._finish(aligned_scan, grid_mask, atlas_grid, votes).labels
            result.update(aligned_scan=aligned_scan, aligned_segmentation=atlas_grid)
        if extras:
            primary = inference.Displacement([(values[:1], factor)
                                              for values, factor in displacement.components])
            flow = primary.full_grid(self.atlas.shape)[0].numpy()
            result.update(flow=flow, warped_atlas=self._warped_atlas(flow))
        return result

    def _segmenter_labels(self, scan, alignment, aligned, clock, keep_aligned,
                          probabilities) -> dict:
        """The segmenter's labels (``segment`` with a segmenter): its probabilities on the
        working grid ('network'), then labels on the scan's own voxels inside its brain
        ('labels'), without a second interpolation of the scan."""
        with clock("network"):
            working = self.segmenter.probabilities(aligned.data)
        with clock("labels"):
            native_to_grid = np.eye(4) if alignment.skipped else alignment.scan_voxel_to_atlas_voxel
            labels = self.segmenter.segment(working, native_to_grid, scan.shape,
                                            brain_mask(scan.data), probabilities or None)
        found = {}
        if probabilities:
            labels, found["probabilities"] = labels
        found["segmentation"] = labels
        if keep_aligned:
            found.update(aligned_scan=aligned, aligned_segmentation=labels if alignment.skipped
                         else self.segmenter.segment(working, np.eye(4), self.atlas.shape,
                                                     brain_mask(aligned.data)))
        return found

    def _similarity(self, alignment) -> str:
        """'remap' (the scan mapped to the atlas's contrast before refinement: ``contrast``) when
        asked, or with 'auto' when the alignment's check flags the scan (its intensities do not
        correlate with the atlas's: another contrast); else 'ncc' (the scan as it is)."""
        if self.similarity == "auto":
            return "ncc" if alignment.ok or self.refiner is None else "remap"
        return self.similarity

    def _atlas_like(self, aligned: data.Volume) -> data.Volume:
        if self._atlas_normalized is None:
            self._atlas_normalized = intensity.normalize_array(self.atlas.data)
        return contrast.atlas_like(aligned, self._atlas_normalized)

    def _displacement(self, aligned: data.Volume, clock: StageClock) -> tuple:
        """(``inference.Displacement`` with one element per atlas, the refinement's numpy outputs
        or None)."""
        flow_working = None
        if self.network is not None:
            with clock("network"):
                flow_working = self.network.working_displacement(aligned)[None]
                if len(self.atlases) > 1:  # the other atlases start from the identity
                    flow_working = np.concatenate(
                        [flow_working, np.zeros((len(self.atlases) - 1, *flow_working.shape[1:]),
                                                np.float32)])
        if self.refiner is None:
            return inference.Displacement([(flow_working, self.config.downsample)]), None
        with clock("refine"):
            return self.refiner(aligned, flow_working)

    def _fusion_weights(self, aligned: data.Volume, refined):
        """Per-atlas weight maps on the refinement's fine grid [A, *grid], or None (one atlas,
        or majority voting)."""
        if len(self.atlases) == 1 or self.fusion_method == "majority":
            return None
        from ltnet_tf.registration import fusion

        scan, warped = refined["scan"], refined["warped_atlas"]
        if self.fusion_method == "local":
            return np.asarray(fusion.locally_weighted_voting_weights(scan, warped), np.float32)
        return np.asarray(fusion.joint_label_fusion_weights(scan, warped, mask=scan > 0),
                          np.float32)

    def _labels(self, displacement, native_to_grid: np.ndarray, native_shape, weights,
                mask, probabilities=None) -> tuple:
        """(the (fused) labels of every atlas pulled onto the ``native_shape`` voxels of ``mask``,
        the wanted labels' fused shares or None (``native.pull_fused``), what several atlases
        voted or None): the shares are left to the intensity model when it is on, the votes are
        its prior."""
        finish = self.intensity_model is not None
        if len(self.pulls) == 1 and (finish or not probabilities):
            return self.pulls[0](displacement.element(0), native_to_grid, native_shape,
                                 grid_shape=self.atlas.shape, mask=mask), None, None
        return pull_fused(self.pulls, displacement, native_to_grid, native_shape,
                          self.atlas.shape, weights,
                          None if weights is None else self.refiner.refinement.factor, mask,
                          None if finish else (probabilities or None),
                          votes=finish and len(self.pulls) > 1)

    def _finish(self, volume: data.Volume, mask, labels, votes=None, probabilities=None):
        """The intensity model on ``volume``'s grid (an ``IntensityResult``); a scan it could not
        model keeps the transfer's labels, with a warning naming the reason."""
        fitted = self.intensity_model(intensity.normalize_array(volume.data), mask, labels,
                                      voxel_sizes(volume.affine), votes, probabilities)
        if fitted.record["warning"] and not fitted.record["applied"]:
            logging.warning("%s: the intensity model was not applied (%s): the label transfer's "
                            "labels are kept", volume.path, fitted.record["warning"])
        elif fitted.record["warning"]:
            logging.warning("%s: intensity model: %s", volume.path, fitted.record["warning"])
        return fitted

    def _warped_atlas(self, flow: np.ndarray) -> np.ndarray:
        atlas = data.normalize_intensity(tf.constant(
            np.asarray(self.atlas.data, np.float32)[None, ..., None]))[0, ..., 0]
        return inference.warp_image(atlas, flow[None])[0].numpy()
