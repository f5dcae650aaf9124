"""Brain extraction of a whole-head T1 scan, and the check that the mask found is a brain's.

The extractor is deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using
Convolutional Neural Networks", Comput. Biol. Med. 2024; MIT licence, its TorchScript weights
inside its wheel, so nothing is downloaded at run time): a coarse network finds the brain's box on
a 128³ copy of the scan, a 3D U-Net segments the box resampled to ``model_shape``³, the mask is
put back on the scan's own grid, its largest component kept, its holes filled, and grown by a
voxel. It was chosen
over BET's deformable surface (``brainextractor``) and over label transfer of a head atlas's mask
through this product's own registration by measurement on six real heads
(``python -m bench.brain_extractors`` at commit 6f16678, bench/results/brain_extractors.md); it
is an optional extra (``pip install "ltnet-tf[heads]"``: PyTorch's CPU build, ~0.75 GB) because
skull-stripped scans, this product's usual input, do not need it.

A mask is checked before anything is segmented with it (``check_mask``): an adult brain's mask
(FreeSurfer's keep 1.41-1.89 L on the six heads, deepbet's grown by a voxel 1.33-1.80 L) holds
0.8-2.0 litres, lies
inside the field of view (a mask reaching the volume's faces was cut off by it, or spilled into the
neck or scalp), and is one piece. A mask that fails is flagged with its figures, never used
silently.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ltnet_tf.config import ConfigError
from ltnet_tf.io import volumes as data

INSTALL_HINT = 'pip install "ltnet-tf[heads]" (deepbet and the CPU build of PyTorch)'


@dataclass(frozen=True)
class BrainExtractionSettings:
    """How a head's brain is extracted and when its mask counts as wrong (recorded per scan)."""
    method: str = "deepbet"
    # Measured on the six heads (bench/results/brain_extractors.md, deepbet sweep): a 192³ box
    # (about 1 mm voxels for a brain's box) costs 6.0 CPU s a head against 8.1 s at deepbet's
    # 256³, for the same Dice; growing the mask by one voxel (6-connected) takes it from deepbet's
    # tight outline to the CSF margin FreeSurfer's masks keep: mean Dice 0.945 -> 0.960, labelled
    # brain left outside at most 0.65 % -> 0.26 %.
    threshold: float = 0.5           # on the network's brain probability
    model_shape: int = 192           # the brain's box is resampled to this cube for the U-Net
    dilation_voxels: int = 1
    min_volume_l: float = 0.8        # adult brains with their CSF: 1.0-1.9 L
    max_volume_l: float = 2.0
    min_component_share: float = 0.01  # a second piece larger than this share of the mask counts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BrainMask:
    """A brain mask on the scan's grid with the figures it was checked on."""
    mask: np.ndarray                 # bool, the scan's shape
    volume_l: float
    components: int                  # pieces larger than min_component_share of the mask
    faces_touched: list = field(default_factory=list)  # e.g. ["i-", "k+"]: voxel-axis faces
    seconds: float = 0.0
    problems: list = field(default_factory=list)
    method: str = "deepbet"

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"method": self.method, "volume_l": round(self.volume_l, 3),
                "components": self.components, "faces_touched": list(self.faces_touched),
                "seconds": round(self.seconds, 3), "ok": self.ok, "problems": list(self.problems)}

    def describe(self, path: str) -> str:
        """One line: the scan, what looks wrong, the figures."""
        return (f"{path}: brain mask looks wrong ({'; '.join(self.problems)}): volume "
                f"{self.volume_l:.2f} L, {self.components} piece(s), field-of-view faces touched: "
                f"{', '.join(self.faces_touched) or 'none'}; check <scan>_brainmask.nii.gz (a "
                f"scan that is not a T1-weighted adult head, or cut off by its field of view?)")


def check_mask(mask: np.ndarray, affine: np.ndarray,
               settings: BrainExtractionSettings = BrainExtractionSettings(),
               seconds: float = 0.0) -> BrainMask:
    """``mask`` [scan grid] bool on the grid ``affine`` -> a ``BrainMask`` whose ``problems``
    name what looks wrong: a volume outside [min_volume_l, max_volume_l], voxels on the faces of
    the field of view, several pieces."""
    mask = np.asarray(mask, bool)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    volume_l = float(mask.sum()) * voxel_ml / 1000.0
    pieces, count = ndimage.label(mask)
    sizes = np.bincount(pieces.ravel())[1:] if count else np.zeros(0)
    components = int((sizes > settings.min_component_share * max(1, mask.sum())).sum())
    faces = []
    for axis, letter in enumerate("ijk"):
        for side, index in (("-", 0), ("+", -1)):
            if np.take(mask, index, axis=axis).any():
                faces.append(f"{letter}{side}")
    problems = []
    if not settings.min_volume_l <= volume_l <= settings.max_volume_l:
        problems.append(f"volume {volume_l:.2f} L outside {settings.min_volume_l}-"
                        f"{settings.max_volume_l} L")
    if faces:
        problems.append("touches the field of view")
    if components != 1:
        problems.append(f"{components} pieces" if components else "empty")
    return BrainMask(mask=mask, volume_l=volume_l, components=components, faces_touched=faces,
                     seconds=seconds, problems=problems, method=settings.method)


class DeepBetExtractor:
    """deepbet on the CPU: ``extractor(scan)`` -> ``BrainMask`` on the scan's grid. The networks
    are loaded once. Raises ConfigError when deepbet (or PyTorch) is not installed."""

    def __init__(self, settings: BrainExtractionSettings = BrainExtractionSettings()):
        try:
            from deepbet import BrainExtraction
        except ImportError as e:
            raise ConfigError(f"brain extraction of whole heads needs deepbet ({e}): "
                              f"{INSTALL_HINT}; or strip the skull yourself and pass "
                              f"--skull_strip no") from None
        self.settings = settings
        self._network = BrainExtraction(no_gpu=True)

    def probability(self, scan: data.Volume) -> np.ndarray:
        """The network's brain probability [scan grid], before thresholding."""
        import nibabel as nib
        import torch

        image = nib.Nifti1Image(np.asarray(scan.data, np.float32), np.asarray(scan.affine, float))
        canonical = nib.as_closest_canonical(image)
        values = canonical.get_fdata(dtype=np.float32)
        shape = (self.settings.model_shape,) * 3
        with torch.inference_mode():
            probability = self._network.run_model(values.copy(), shape=shape)
        back = nib.orientations.ornt_transform(nib.io_orientation(canonical.affine),
                                               nib.io_orientation(image.affine))
        return nib.orientations.apply_orientation(probability, back)

    def __call__(self, scan: data.Volume) -> BrainMask:
        start = time.time()
        probability = self.probability(scan)
        mask = self._largest_filled(probability > self.settings.threshold)
        if self.settings.dilation_voxels:
            mask = ndimage.binary_dilation(mask, iterations=self.settings.dilation_voxels)
        return check_mask(mask, scan.affine, self.settings, time.time() - start)

    @staticmethod
    def _largest_filled(mask: np.ndarray) -> np.ndarray:
        """The largest piece, its holes filled (deepbet's own post-processing)."""
        pieces, count = ndimage.label(mask)
        if count > 1:
            mask = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
        return ndimage.binary_fill_holes(mask)


def make_extractor(settings: BrainExtractionSettings = BrainExtractionSettings()):
    """The extractor ``settings.method`` names. Raises ConfigError for an unknown method or a
    missing optional dependency."""
    if settings.method == "deepbet":
        return DeepBetExtractor(settings)
    raise ConfigError(f"unknown brain extraction method {settings.method!r} (known: deepbet)")
