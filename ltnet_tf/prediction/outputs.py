"""The output folder of ``predict.py`` and the files it writes per scan.

    OUT/<scan>_seg.nii.gz             the segmentation on the scan's own grid and header
    OUT/<scan>_affine.txt             the alignment, ITK/ANTs format (atlas -> scan, LPS)
    OUT/<scan>_brainmask.nii.gz       a whole head's extracted brain mask (uint8 0/1, its grid)
    OUT/<scan>_aligned.nii.gz         with --save_aligned: the scan on the atlas grid,
    OUT/<scan>_aligned_seg.nii.gz     and its segmentation there
    OUT/<scan>_warped_atlas.nii.gz    with --save_warped_atlas (atlas grid, or the scan's when it
    OUT/<scan>_flow.nii.gz            with --save_flow          was on the atlas grid already)
    OUT/<scan>_probabilities.nii.gz   with --save_probabilities: 4D, one volume per structure
                                      (order in prediction.json), the scan's grid, values 0..1
    OUT/volumes.csv, dice.csv, dice.json, prediction.json     see ``ltnet_tf.reporting.tables``

Every file is written under a temporary name and renamed (``ltnet_tf.files``).
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from ltnet_tf.files import atomic_write
from ltnet_tf.io import volumes as data

# <scan><suffix>.nii.gz, as below
OUTPUT_SUFFIXES = ("_seg", "_warped_atlas", "_flow", "_aligned", "_brainmask")


class OutputFolder:
    """Where one prediction writes; knows its own earlier outputs so they are not taken for scans."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def scans_among(self, images) -> list:
        """The scans of ``images``, less the files an earlier prediction wrote into this folder when
        it is also the scans' folder: they are segmentations, not scans (``v0_seg_seg.nii.gz``).
        Raises DataError when nothing else is left."""
        scans, earlier = [], []
        for path in data.list_images(images):
            in_output = os.path.dirname(os.path.abspath(path)) == self.path
            is_output = in_output and data.scan_name(path).endswith(OUTPUT_SUFFIXES)
            (earlier if is_output else scans).append(path)
        if earlier:
            logging.warning("%s: skipping %d earlier outputs of predict.py among the scans (%s)",
                            self.path, len(earlier),
                            ", ".join(os.path.basename(p) for p in earlier[:3])
                            + (", ..." if len(earlier) > 3 else ""))
        if not scans:
            raise data.DataError(f"{self.path}: no scans besides earlier outputs of predict.py")
        return scans

    def prepare(self) -> "OutputFolder":
        """Create the folder; DataError when it cannot be created or written."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise data.DataError(f"{self.path}: cannot create output folder ({e.strerror})") \
                from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise data.DataError(f"{self.path}: output folder is not writable")
        return self

    def write_scan(self, name: str, scan: data.Volume, result: dict, atlas_affine, *,
                   save_aligned=False, save_warped_atlas=False, save_flow=False) -> str:
        """The files of one scan (see the module docstring); returns the segmentation's path.

        ``result``: ``Predictor.segment``'s ('segmentation', 'alignment', and as asked
        'aligned_scan', 'aligned_segmentation', 'warped_atlas', 'flow')."""
        alignment = result["alignment"]
        path = self.join(f"{name}_seg.nii.gz")
        data.save_nifti(result["segmentation"], scan.affine, path, header=scan.header)
        prepared = result.get("prepared")
        if prepared is not None and prepared.brain_mask is not None:
            data.save_nifti(prepared.brain_mask.mask.astype(np.uint8), scan.affine,
                            self.join(f"{name}_brainmask.nii.gz"), header=scan.header,
                            dtype="uint8")
        if not alignment.skipped:
            with atomic_write(self.join(f"{name}_affine.txt")) as f:
                f.write(alignment.itk_transform_text())
        if save_aligned:
            data.save_nifti(result["aligned_scan"].data, atlas_affine,
                            self.join(f"{name}_aligned.nii.gz"), dtype="float32")
            data.save_nifti(result["aligned_segmentation"], atlas_affine,
                            self.join(f"{name}_aligned_seg.nii.gz"))
        # Atlas-grid outputs: the scan's grid when it was on the atlas grid already.
        grid_affine = scan.affine if alignment.skipped else atlas_affine
        if save_warped_atlas:
            data.save_nifti(result["warped_atlas"][..., 0], grid_affine,
                            self.join(f"{name}_warped_atlas.nii.gz"), dtype="float32")
        if save_flow:
            data.save_nifti(result["flow"], grid_affine, self.join(f"{name}_flow.nii.gz"),
                            dtype="float32")
        return path

    def write_probabilities(self, name: str, scan: data.Volume, probabilities) -> str:
        """``<scan>_probabilities.nii.gz``: [*scan grid, L] fused label probabilities, stored as
        uint8 with a scale factor of 1/255 (readers get 0..1 from the header's scaling)."""
        import nibabel as nib

        from ltnet_tf.files import atomic_path

        path = self.join(f"{name}_probabilities.nii.gz")
        image = nib.Nifti1Image(np.moveaxis(np.asarray(probabilities, np.uint8), 0, -1),
                                scan.affine)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1.0 / 255.0, 0.0)
        image.header.set_intent("estimate", name="probabilities")
        with atomic_path(path) as tmp:
            nib.save(image, tmp)
        return path
