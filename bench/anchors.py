"""The anchors the product is measured against, in one place: no registration (the floor), ANTs
(antspyx) and ConvexAdam (``convexAdam`` on PyPI). Each turns a scan file on the atlas grid into
a segmentation file, timed end to end; reading the atlases is ``load_seconds``; after the clock,
the folding fraction (brain voxels where
the Jacobian determinant of the whole map is <= 0).
"""
from __future__ import annotations

import glob
import os
import tempfile
import time

import nibabel as nib
import numpy as np

from ltnet_tf.io import volumes


def _write(segmentation: np.ndarray, image_path: str, output_path: str) -> None:
    image = nib.load(image_path)  # header only
    volumes.save_nifti(segmentation.astype(np.int32), image.affine, output_path,
                       header=image.header)


class AtlasLabels:
    """No registration: the atlas labels as they are (the scans are affinely aligned already)."""

    description = "atlas labels as they are, no registration"

    def __init__(self, atlas_labels_path: str):
        start = time.time()
        self.atlas_labels = volumes.load_label_map(atlas_labels_path).data
        self.load_seconds = time.time() - start

    def segment(self, image_path: str, output_path: str) -> dict:
        start = time.time()
        volumes.load_scan(image_path)
        _write(self.atlas_labels, image_path, output_path)
        return {"segmentation": self.atlas_labels, "seconds": time.time() - start,
                "folding_fraction": 0.0}


class AntsAtlases:
    """Each atlas registered to a scan once by ``ants.registration(type_of_transform='SyN')``
    (antspyx's defaults), its labels warped onto the scan's full grid (``genericLabel``), and one
    segmentation per rule of ``rules`` {name: (rule, count)}: 'syn' (the first atlas's labels),
    'majority' (``ltnet_tf.registration.fusion.fuse_labels`` of the first ``count``: ties to the
    first) or 'jlf' (``ants.joint_label_fusion`` of the first ``count``). Each one's seconds are
    what it would take alone: read, resample, register and warp its atlases, fuse, write.

    ``spacing``: register images resampled to this voxel size in mm. Joint label fusion: antspyx's
    defaults (patch radius 2, rho 0.01, search radius ``search_radius``) but beta = 2 (the paper's);
    images x ``intensity_scale`` (ANTs floors a patch's standard deviation at 1 unit); with
    ``histogram_match`` each warped atlas matched to the scan first, as ANTs users prepare atlases
    of another site (without: Dice 0.558 on MICCAI 1000, bench/results/fusion.md of 2dcace4).
    ~6 min per atlas and 1 mm scan on 2 cores at search radius 3; SyN ~65 s per atlas.
    """

    RULES = ("syn", "majority", "jlf")

    def __init__(self, atlas_paths, atlas_label_paths, rules: dict, spacing: float = None,
                 search_radius: int = 3, intensity_scale: float = 255.0,
                 histogram_match: bool = True):
        import ants
        for name, (rule, count) in rules.items():
            if rule not in self.RULES or not 1 <= count <= len(atlas_paths) or (
                    rule == "syn") != (count == 1):
                raise ValueError(f"{name}: rule {rule!r} of {count} atlases: 'syn' takes 1, "
                                 f"'majority' and 'jlf' 2..{len(atlas_paths)}")
        self.ants, self.rules, self.spacing = ants, dict(rules), spacing
        self.search_radius, self.intensity_scale = search_radius, intensity_scale
        self.histogram_match = histogram_match
        start = time.time()
        self.atlases = [ants.image_read(path) for path in atlas_paths]
        self.atlas_labels = [ants.image_read(path) for path in atlas_label_paths]
        self.moving = [self._resample(atlas) for atlas in self.atlases]
        self.load_seconds = time.time() - start
        grid = f"{spacing:g} mm grids" if spacing else "the full grid"
        registration = (f"ants.registration(type_of_transform='SyN') (antspyx "
                        f"{ants.__version__} defaults) on {grid}, labels warped with genericLabel")
        self.jlf_method = (f"ants.joint_label_fusion(beta=2, rad=2, rho=0.01, usecor=False, "
                           f"r_search={search_radius}), intensities x {intensity_scale:g}"
                           + (", atlases histogram-matched to the scan" if histogram_match
                              else ""))
        fusions = {"syn": "no fusion", "jlf": self.jlf_method,
                   "majority": "majority vote of the warped labels (ties: first atlas)"}
        self.descriptions = {name: f"{count} atlas{'es' if count > 1 else ''}, each by "
                                   f"{registration}; {fusions[rule]}"
                             for name, (rule, count) in self.rules.items()}
        self.description = "; ".join(self.descriptions.values())

    def _resample(self, image):
        if not self.spacing:
            return image
        return self.ants.resample_image(image, (self.spacing,) * 3, use_voxels=False,
                                        interp_type=0)

    def _register(self, scan, count: int, images: bool) -> dict:
        ants, start = self.ants, time.time()
        fixed = self._resample(scan)
        found = {"registrations": [], "warped_images": [], "warped_labels": [],
                 "seconds": {"resample": time.time() - start, "atlases": []}}
        for moving, atlas, labels in list(zip(self.moving, self.atlases,
                                              self.atlas_labels))[:count]:
            start = time.time()
            registration = ants.registration(fixed, moving, type_of_transform="SyN")
            found["registrations"].append(registration)
            stage = time.time()
            found["warped_labels"].append(ants.apply_transforms(
                scan, labels, registration["fwdtransforms"], interpolator="genericLabel"))
            times = {"register": stage - start, "warp_labels": time.time() - stage}
            if images:
                stage = time.time()
                found["warped_images"].append(ants.apply_transforms(
                    scan, atlas, registration["fwdtransforms"]))
                times["warp_image"] = time.time() - stage
            found["seconds"]["atlases"].append(times)
        return found

    def _folding(self, scan, registrations) -> list:
        """Each registration's folding fraction (affine and warp composed) in the scan's non-zero
        voxels; removes its transform files."""
        ants, mask, folding = self.ants, scan.numpy() > 0, []
        for registration, moving in zip(registrations, self.moving):
            with tempfile.TemporaryDirectory() as folder:
                composed = ants.apply_transforms(scan, moving, registration["fwdtransforms"],
                                                 compose=os.path.join(folder, "composed"))
                determinant = ants.create_jacobian_determinant_image(scan, composed).numpy()
            folding.append(float(np.mean(determinant[mask] <= 0)))
            for path in {*registration["fwdtransforms"], *registration["invtransforms"]}:
                for leftover in glob.glob(path):
                    os.remove(leftover)
        return folding

    def _fuse(self, scan, rule: str, images, labels) -> np.ndarray:
        if rule == "syn":
            return np.rint(labels[0].numpy()).astype(np.int32)
        if rule == "majority":
            from ltnet_tf.registration import fusion
            candidates = np.stack([np.rint(v.numpy()).astype(np.int32).ravel() for v in labels])
            return fusion.fuse_labels(candidates).reshape(scan.shape)
        ants, scale = self.ants, self.intensity_scale
        mask = ants.get_mask(scan, low_thresh=1e-6, cleanup=0)
        if self.histogram_match:
            images = [ants.histogram_match_image(image, scan) * mask for image in images]
        with tempfile.TemporaryDirectory() as folder:
            fused = ants.joint_label_fusion(
                scan * scale, mask, [image * scale for image in images], beta=2, rad=2,
                label_list=labels, rho=0.01, usecor=False, r_search=self.search_radius,
                output_prefix=os.path.join(folder, "fusion"))
        return np.rint(fused["segmentation"].numpy()).astype(np.int32)

    def segment_all(self, image_path: str, output_paths: dict) -> dict:
        """One scan -> {name: {'segmentation', 'seconds', 'seconds_parts', 'folding_fraction',
        'folding_fractions'}} for every rule, each written to ``output_paths[name]``."""
        start = time.time()
        scan = self.ants.image_read(image_path)
        read = time.time() - start
        found = self._register(scan, max(count for _, count in self.rules.values()),
                               images=any(rule == "jlf" for rule, _ in self.rules.values()))
        per_atlas, results = found["seconds"]["atlases"], {}
        for name, (rule, count) in self.rules.items():
            start = time.time()
            segmentation = self._fuse(scan, rule, found["warped_images"][:count],
                                      found["warped_labels"][:count])
            fuse = time.time() - start
            start = time.time()
            _write(segmentation, image_path, output_paths[name])
            parts = {"read": read, "resample": found["seconds"]["resample"],
                     "register": sum(a["register"] for a in per_atlas[:count]),
                     "warp": sum(a["warp_labels"] + (a["warp_image"] if rule == "jlf" else 0.0)
                                 for a in per_atlas[:count]),
                     "fuse": fuse, "write": time.time() - start}
            results[name] = {"segmentation": segmentation, "seconds": sum(parts.values()),
                             "seconds_parts": parts}
        folding = self._folding(scan, found["registrations"])
        for name, (_, count) in self.rules.items():
            results[name].update(folding_fraction=float(np.mean(folding[:count])),
                                 folding_fractions=folding[:count])
        return results

    def segment(self, image_path: str, output_path: str) -> dict:
        """The one rule of a single-rule instance (accuracy's ants_syn)."""
        (name,) = self.rules
        return self.segment_all(image_path, {name: output_path})[name]


class ConvexAdam:
    """ConvexAdam (Siebert, Hansen & Heinrich, "Fast 3D registration with accurate optimisation and
    little learning for Learn2Reg 2021"; the ``convexAdam`` package, ``convex_adam_pt`` with its
    defaults: MIND-SSC features, a coupled convex search on a 6-voxel grid, 80 Adam steps on a
    2-voxel grid) registers the atlas to each scan, whose labels are then read at the displaced
    voxels by nearest neighbour (as the package's ``apply_convex`` reads images, order 0). On the
    CPU with ``threads`` PyTorch threads (the 2 of the product's fixed pools)."""

    def __init__(self, atlas_path: str, atlas_labels_path: str, threads: int = 2):
        import torch
        from convexAdam.convex_adam_MIND import convex_adam_pt
        torch.set_num_threads(threads)
        self.register = convex_adam_pt
        start = time.time()
        self.atlas = volumes.load_scan(atlas_path).data.astype(np.float32)
        self.atlas_labels = volumes.load_label_map(atlas_labels_path).data
        self.load_seconds = time.time() - start
        import convexAdam
        self.description = (f"ConvexAdam (convexAdam {getattr(convexAdam, '__version__', '0.2.0')}"
                            f", convex_adam_pt defaults, MIND-SSC, CPU, {threads} threads); "
                            f"atlas labels warped by nearest neighbour")

    def segment(self, image_path: str, output_path: str) -> dict:
        from scipy.ndimage import map_coordinates
        start = time.time()
        scan = volumes.load_scan(image_path)
        displacement = self.register(img_fixed=scan.data.astype(np.float32),
                                     img_moving=self.atlas)  # [D, H, W, 3], voxels
        grid = np.meshgrid(*(np.arange(n) for n in scan.shape), indexing="ij")
        points = np.moveaxis(displacement, -1, 0) + grid
        segmentation = map_coordinates(self.atlas_labels, points, order=0, mode="nearest")
        _write(segmentation, image_path, output_path)
        seconds = time.time() - start
        from ltnet_tf.io import evaluation
        return {"segmentation": segmentation.astype(np.int32), "seconds": seconds,
                "folding_fraction": evaluation.folding_fraction(displacement.astype(np.float32),
                                                                scan.data > 0)}
