"""NIfTI headers whose two orientation fields, the sform and the qform, place the voxels differently.

A NIfTI header can carry two voxel-to-world affines. nibabel uses the sform whenever its code is
non-zero, else the qform (``Nifti1Header.get_best_affine``); ITK, and so ANTs and SimpleITK, may use
the qform instead. When both codes are set and the two disagree, the same file has different voxel
sizes or positions in different tools, and the checks downstream (the brain's volume, the alignment)
fail for a reason the user cannot see. Here the disagreement is found when a file is read, so that
those checks can name it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import nibabel as nib
import numpy as np


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths in mm of a 4x4 voxel-to-world affine."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def format_mm(sizes) -> str:
    """(0.5, 0.5, 1.0) -> '0.5 x 0.5 x 1 mm'."""
    return " x ".join(f"{float(s):.3g}" for s in sizes) + " mm"


def how_affines_differ(reference: np.ndarray, other: np.ndarray) -> str:
    """How two voxel-to-world affines differ, for a message: 'voxel sizes 1 x 1 x 1 mm vs
    1 x 1 x 1.2 mm', 'orientation LIA vs RAS', 'origin moved 3 mm'."""
    sizes = [format_mm(voxel_sizes(a)) for a in (reference, other)]
    codes = ["".join(nib.aff2axcodes(a)) for a in (reference, other)]
    shift = float(np.linalg.norm(np.asarray(other)[:3, 3] - np.asarray(reference)[:3, 3]))
    parts = ([f"voxel sizes {sizes[0]} vs {sizes[1]}"] if sizes[0] != sizes[1] else []) + \
        ([f"orientation {codes[0]} vs {codes[1]}"] if codes[0] != codes[1] else []) + \
        ([f"origin moved {shift:.3g} mm"] if shift > 1e-3 else [])
    return ", ".join(parts) or "a slight rotation or shear"


@dataclass(frozen=True)
class HeaderConflict:
    """The sform and the qform of one file, both with a non-zero code, that disagree."""
    sform: np.ndarray
    qform: np.ndarray
    used: str  # which one nibabel (and so ltnet_tf) uses: "sform" or "qform"
    distance_mm: float  # largest distance between where the two place a corner of the grid

    @property
    def unused(self) -> str:
        return "qform" if self.used == "sform" else "sform"

    def affine(self, which: str) -> np.ndarray:
        return self.sform if which == "sform" else self.qform

    def volume_ratio(self) -> float:
        """Voxel volume of the unused affine over that of the used one."""
        return (abs(float(np.linalg.det(self.affine(self.unused)[:3, :3])))
                / abs(float(np.linalg.det(self.affine(self.used)[:3, :3]))))

    def describe(self) -> str:
        """One clause naming both affines' voxel sizes and which one is used."""
        sizes = {which: format_mm(voxel_sizes(self.affine(which))) for which in ("sform", "qform")}
        if sizes["sform"] == sizes["qform"]:
            what = f"same {sizes['sform']} voxels, placed up to {self.distance_mm:.0f} mm apart"
        else:
            what = (f"{self.used} {sizes[self.used]} voxels, used; {self.unused} "
                    f"{sizes[self.unused]}")
        return f"its header's sform and qform disagree ({what})"

    def fix(self, path: str) -> str:
        """How to make the two agree, for a message."""
        return (f"if the {self.unused} is right, copy it over the {self.used} "
                f"(fslorient -copy{self.unused}2{self.used} {path}, or with nibabel "
                f"img.set_{self.used}(img.get_{self.unused}()) and save)")

    def to_dict(self) -> dict:
        return {"used": self.used, "distance_mm": round(self.distance_mm, 3),
                "sform_voxel_mm": np.round(voxel_sizes(self.sform), 4).tolist(),
                "qform_voxel_mm": np.round(voxel_sizes(self.qform), 4).tolist(),
                "sform": np.round(self.sform, 6).tolist(), "qform": np.round(self.qform, 6).tolist()}


def _grid_corners(shape) -> np.ndarray:
    """The 8 corner voxels of a grid of ``shape`` (3 axes) as homogeneous coordinates [8, 4]."""
    last = np.asarray(shape[:3], float) - 1
    corners = np.array(np.meshgrid(*[[0.0, s] for s in last], indexing="ij")).reshape(3, -1).T
    return np.c_[corners, np.ones(len(corners))]


def find_conflict(image) -> Optional[HeaderConflict]:
    """The sform/qform disagreement of a loaded NIfTI image, or None (MGZ, one code unset, or the
    two place every corner of the grid within half the smallest voxel of each other: closer than
    that, e.g. an sform with a slight shear that a qform cannot hold, no check can tell)."""
    header = image.header
    if not isinstance(header, nib.Nifti1Header):  # includes NIfTI-2; MGH has one affine only
        return None
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if not sform_code or not qform_code:
        return None
    corners = _grid_corners(image.shape)
    distance = float(np.max(np.linalg.norm((corners @ sform.T - corners @ qform.T)[:, :3], axis=1)))
    tolerance = 0.5 * float(min(voxel_sizes(sform).min(), voxel_sizes(qform).min()))
    if distance <= tolerance:
        return None
    used = "sform" if np.allclose(header.get_best_affine(), sform) else "qform"
    return HeaderConflict(sform=np.asarray(sform, float), qform=np.asarray(qform, float),
                          used=used, distance_mm=distance)
