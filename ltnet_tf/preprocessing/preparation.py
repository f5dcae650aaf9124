"""What happens to one scan before it is aligned: brain extraction of a whole head, then N4.

    --skull_strip auto   strip a scan that looks like a whole head (``looks_like_head``:
                         over 2.3 L of tissue, more than any skull-stripped brain, no more than a
                         head), else use it as it is (and refuse it as before if it is no brain)
    --skull_strip yes    strip every scan (a skull-stripped scan loses little: the extractor keeps
                         its brain); a scan with less tissue than a brain or more than a head is
                         still refused before anything is written
    --skull_strip no     never (a head is refused, as before)
    --bias_correction    auto: N4 on the brain mask of the scans that were stripped (heads come
                         straight off the scanner; skull-stripped scans were usually corrected by
                         the pipeline that stripped them); yes: every scan; no: never

The stripped scan is the head with every voxel outside the mask set to 0: the rest of the pipeline
(normalisation, alignment, refinement, the label pull inside the brain) sees a skull-stripped brain.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ltnet_tf.config import ConfigError
from ltnet_tf.io import plausibility, volumes as data
from ltnet_tf.preprocessing.bias import BiasSettings, correct_bias
from ltnet_tf.preprocessing.brain_extraction import (BrainExtractionSettings, BrainMask,
                                                     make_extractor)

SKULL_STRIP_MODES = ("auto", "yes", "no")
BIAS_MODES = ("auto", "yes", "no")


@dataclass(frozen=True)
class PreparationOptions:
    """``predict.py``'s --skull_strip and --bias_correction, with their settings."""
    skull_strip: str = "auto"
    bias_correction: str = "auto"
    extraction: BrainExtractionSettings = field(default_factory=BrainExtractionSettings)
    bias: BiasSettings = field(default_factory=BiasSettings)

    def __post_init__(self):
        if self.skull_strip not in SKULL_STRIP_MODES:
            raise ConfigError(f"--skull_strip must be one of {', '.join(SKULL_STRIP_MODES)}, "
                              f"got {self.skull_strip!r}")
        if self.bias_correction not in BIAS_MODES:
            raise ConfigError(f"--bias_correction must be one of {', '.join(BIAS_MODES)}, got "
                              f"{self.bias_correction!r}")

    def to_dict(self) -> dict:
        return {"skull_strip": self.skull_strip, "bias_correction": self.bias_correction,
                "extraction": self.extraction.to_dict(), "bias": self.bias.to_dict()}


@dataclass
class PreparedScan:
    """A scan made ready for alignment: ``scan`` (stripped and/or corrected, or the input),
    ``brain_mask`` (a ``BrainMask`` when it was stripped), ``bias`` (N4's record, or None)."""
    scan: data.Volume
    brain_mask: Optional[BrainMask] = None
    bias: Optional[dict] = None

    @property
    def changed(self) -> bool:
        return self.brain_mask is not None or self.bias is not None

    def to_dict(self) -> dict:
        return {"brain_mask": None if self.brain_mask is None else self.brain_mask.to_dict(),
                "bias_correction": self.bias}


class ScanPreparation:
    """Decides per scan what it needs (``strips``), checks it before anything is written
    (``check``) and prepares it (``__call__``). ``min_brain_ml``: the least tissue of a plausible
    brain (``alignment.AlignmentSettings.min_tissue_ml``): less is refused, head or not."""

    def __init__(self, options: PreparationOptions = None, min_brain_ml: float = 500.0):
        self.options = options or PreparationOptions()
        self.min_brain_ml = min_brain_ml
        self._extractor = None

    def strips(self, scan: data.Volume) -> bool:
        mode = self.options.skull_strip
        return mode == "yes" or (mode == "auto" and plausibility.looks_like_head(scan))

    def check(self, scan: data.Volume) -> bool:
        """True when the scan will be stripped; then its tissue must be a brain's or a head's
        (else ``data.DataError`` naming the cause) and the extractor must load (else
        ``ConfigError``: not installed). False: the caller checks it as a skull-stripped brain."""
        if not self.strips(scan):
            return False
        plausibility.check_brain_size(scan, self.min_brain_ml, plausibility.MAX_HEAD_ML)
        self.extractor()
        return True

    def extractor(self):
        """The brain extractor, loaded once (ConfigError when its package is missing)."""
        if self._extractor is None:
            self._extractor = make_extractor(self.options.extraction)
        return self._extractor

    def __call__(self, scan: data.Volume) -> PreparedScan:
        """The scan stripped (when ``strips``) and N4-corrected (as --bias_correction says)."""
        prepared = PreparedScan(scan=scan)
        if self.strips(scan):
            mask = self.extractor()(scan)
            prepared.brain_mask = mask
            stripped = np.where(mask.mask, np.asarray(scan.data, np.float32), 0.0)
            prepared.scan = dataclasses.replace(scan, data=stripped.astype(np.float32))
        mode = self.options.bias_correction
        if mode == "yes" or (mode == "auto" and prepared.brain_mask is not None):
            brain = (prepared.brain_mask.mask if prepared.brain_mask is not None
                     else np.asarray(scan.data) != 0)
            prepared.scan, prepared.bias = correct_bias(prepared.scan, brain, self.options.bias)
            if prepared.brain_mask is not None:  # the correction divides the outside too
                prepared.scan.data[~brain] = 0.0
        return prepared
