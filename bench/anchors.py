"""What ``bench/accuracy.py`` measures against: validation sets and one segmenter per method.

Every segmenter turns one scan file on the atlas grid into a segmentation file, timed end to end
(read the NIfTI, everything the method does, write the segmentation); what depends only on the atlas
or the model (reading it, restoring weights, tracing graphs) is timed once as ``load_seconds``.
After the clock stops, each reports the folding fraction of its deformation: the fraction of brain
voxels (the scan's non-zero voxels, the same mask for every method) where the Jacobian determinant
of the map from scan voxels to atlas positions is <= 0.

    AtlasLabels     no registration: the atlas labels as they are (the floor)
    AntsSyn         ANTs SyN with antspyx's defaults, at full resolution or on a coarser grid
    AntsJointLabelFusion  several atlases, each by SyN as AntsSyn, fused by ANTs' joint label fusion
    AntsMajorityVote      the same registrations, the warped labels fused by majority vote
    AntsAtlasFusions      the atlases registered once per scan; SyN of the first, majority vote
                          and joint label fusion of the first N made of those registrations
    Product         the product's own Predictor: a run folder's G_F and/or test-time refinement,
                    one atlas or several fused
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import dataclasses
import glob
import json
import os
import subprocess
import tempfile
import time

import nibabel as nib
import numpy as np

from ltnet_tf.io import evaluation, volumes as data

SHARED_SUBJECTS = ("sub-06", "sub-07")
MICCAI_SUBJECTS = ("1000", "1001", "1002", "1006", "1007", "1008")


# ------------------------------------------------------------------------------- validation sets
@dataclasses.dataclass(frozen=True)
class Case:
    """One validation scan and its reference labels, both on the atlas grid."""
    set_name: str
    subject: str
    image_path: str
    label_path: str


def shared_cases(data_dir: str, subjects=SHARED_SUBJECTS) -> list:
    """sub-06, sub-07 of ../shared/data: already affinely aligned to the atlas, on its grid."""
    return [Case("shared", s, os.path.join(data_dir, "images", f"{s}.nii.gz"),
                 os.path.join(data_dir, "labels", f"{s}.nii.gz")) for s in subjects]


def _source_hash(path: str) -> str:
    """Git blob hash of a file: the aligned cache is remade when the alignment code changes."""
    return subprocess.run(["git", "hash-object", path], capture_output=True, text=True,
                          check=True).stdout.strip()


def miccai_cases(data_dir: str, cache_dir: str, subjects=MICCAI_SUBJECTS, log=print) -> tuple:
    """MICCAI 2012 subjects aligned once to the atlas (``ltnet_tf.registration.alignment``), cached as NIfTI on
    the atlas grid so that every method reads the same input. -> (cases, manifest)."""
    from ltnet_tf.registration import alignment

    source = os.path.join(data_dir, "miccai2012")
    manifest_path = os.path.join(cache_dir, "alignment.json")
    code_hash = _source_hash(alignment.__file__)
    manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    if manifest.get("alignment_source_hash") != code_hash:
        manifest = {"alignment_source_hash": code_hash, "subjects": {}}
    aligner, cases = None, []
    for subject in subjects:
        image_path = os.path.join(cache_dir, "images", f"{subject}.nii.gz")
        label_path = os.path.join(cache_dir, "labels", f"{subject}.nii.gz")
        cached = (subject in manifest["subjects"] and os.path.isfile(image_path)
                  and os.path.isfile(label_path))
        if not cached:
            if aligner is None:
                atlas = data.load_scan(os.path.join(data_dir, "atlas.nii.gz"))
                aligner = alignment.AtlasAligner(atlas)
                manifest["settings"] = aligner.settings.to_dict()
            start = time.time()
            scan = data.load_scan(os.path.join(source, "images", f"{subject}.nii.gz"))
            result = aligner.align(scan)
            aligned = result.resample_scan(scan)
            labels = result.resample_labels(
                data.load_label_map(os.path.join(source, "labels", f"{subject}.nii.gz")))
            seconds = time.time() - start
            data.save_nifti(aligned.data, aligned.affine, image_path, dtype="float32")
            data.save_nifti(labels.data, labels.affine, label_path)
            manifest["subjects"][subject] = {"seconds_with_resampling": round(seconds, 2),
                                             **result.to_dict()}
            with open(manifest_path, "w") as f:
                json.dump(manifest, f, indent=2)
            log(f"aligned MICCAI {subject} to the atlas in {seconds:.1f} s (brain overlap "
                f"{result.brain_overlap:.2f}) -> {image_path}")
        cases.append(Case("miccai2012", subject, image_path, label_path))
    return cases, manifest


def _write_segmentation(segmentation: np.ndarray, image_path: str, output_path: str) -> None:
    image = nib.load(image_path)  # header only
    data.save_nifti(segmentation.astype(np.int32), image.affine, output_path, header=image.header)


# ------------------------------------------------------------------------------- segmenters
class AtlasLabels:
    """No registration: the atlas labels as they are (the scans are affinely aligned already)."""

    description = "atlas labels as they are, no registration"

    def __init__(self, atlas_labels_path: str):
        start = time.time()
        self.atlas_labels = data.load_label_map(atlas_labels_path).data
        self.load_seconds = time.time() - start

    def segment(self, image_path: str, output_path: str) -> dict:
        start = time.time()
        data.load_scan(image_path)
        _write_segmentation(self.atlas_labels, image_path, output_path)
        return {"segmentation": self.atlas_labels, "seconds": time.time() - start,
                "folding_fraction": 0.0}


class AntsSyn:
    """``ants.registration(fixed=scan, moving=atlas, type_of_transform='SyN')`` with antspyx's
    defaults (affine stage, then SyN), the atlas labels carried by the resulting transforms with
    ``genericLabel`` interpolation onto the scan's full grid.

    ``spacing``: register images resampled (linearly) to this voxel size in mm; the labels still
    land on the scan's own grid. The atlas is resampled once (``load_seconds``), the scan per scan.
    """

    def __init__(self, atlas_path: str, atlas_labels_path: str, spacing: float = None):
        import ants
        self.ants = ants
        start = time.time()
        self.spacing = spacing
        self.atlas_labels = ants.image_read(atlas_labels_path)
        atlas = ants.image_read(atlas_path)
        self.moving = self._resample(atlas)
        self.load_seconds = time.time() - start
        self.description = (f"ants.registration(type_of_transform='SyN'), antspyx "
                            f"{ants.__version__} defaults, on "
                            + (f"{spacing:g} mm grids" if spacing else "the full grid")
                            + "; labels by apply_transforms(interpolator='genericLabel')")

    def _resample(self, image):
        if not self.spacing:
            return image
        return self.ants.resample_image(image, (self.spacing,) * 3, use_voxels=False,
                                        interp_type=0)

    def segment(self, image_path: str, output_path: str) -> dict:
        ants = self.ants
        start = time.time()
        scan = ants.image_read(image_path)
        registration = ants.registration(self._resample(scan), self.moving,
                                         type_of_transform="SyN")
        transforms = registration["fwdtransforms"]
        warped = ants.apply_transforms(scan, self.atlas_labels, transforms,
                                       interpolator="genericLabel")
        segmentation = np.rint(warped.numpy()).astype(np.int32)
        _write_segmentation(segmentation, image_path, output_path)
        seconds = time.time() - start
        # Folding of the whole map (affine and warp composed) on the scan's full grid.
        with tempfile.TemporaryDirectory() as folder:
            composed = ants.apply_transforms(scan, self.moving, transforms,
                                             compose=os.path.join(folder, "composed"))
            determinant = ants.create_jacobian_determinant_image(scan, composed).numpy()
        mask = scan.numpy() > 0
        for path in {*registration["fwdtransforms"], *registration["invtransforms"]}:
            for leftover in glob.glob(path):
                os.remove(leftover)
        return {"segmentation": segmentation, "seconds": seconds,
                "folding_fraction": float(np.mean(determinant[mask] <= 0))}


class _AntsAtlases:
    """Several atlases (image + label map) each registered to the scan as ``AntsSyn`` does, its
    image and labels carried onto the scan's full grid; subclasses fuse them (``_fuse``).
    ``spacing`` as in ``AntsSyn``. ``folding_fraction`` is the mean over the atlases."""

    method = ""

    def __init__(self, atlas_paths, atlas_label_paths, spacing: float = None):
        import ants
        if len(atlas_paths) != len(atlas_label_paths) or not atlas_paths:
            raise ValueError("need one label map per atlas image, and at least one atlas")
        self.ants = ants
        start = time.time()
        self.spacing = spacing
        self.atlases = [ants.image_read(path) for path in atlas_paths]
        self.atlas_labels = [ants.image_read(path) for path in atlas_label_paths]
        self.moving = [self._resample(atlas) for atlas in self.atlases]
        self.load_seconds = time.time() - start
        self.description = (f"{len(atlas_paths)} atlases, each by ants.registration("
                            f"type_of_transform='SyN') (antspyx {ants.__version__} defaults) on "
                            + (f"{spacing:g} mm grids" if spacing else "the full grid")
                            + f"; {self.method}")

    _resample = AntsSyn._resample

    def _fuse(self, scan, warped_images, warped_labels) -> np.ndarray:
        raise NotImplementedError

    def register(self, scan, count: int = None, images: bool = True) -> dict:
        """The first ``count`` atlases (all by default) registered to ``scan`` (an ANTsImage) ->
        {'registrations', 'warped_labels' and with ``images`` 'warped_images' (ANTsImages on the
        scan's grid), 'seconds': {'resample': s, 'atlases': [{'register', 'warp_labels',
        'warp_image'} s per atlas]}}."""
        ants = self.ants
        start = time.time()
        fixed = self._resample(scan)
        seconds = {"resample": time.time() - start, "atlases": []}
        registered = {"registrations": [], "warped_images": [], "warped_labels": [],
                      "seconds": seconds}
        for moving, atlas, labels in list(zip(self.moving, self.atlases,
                                              self.atlas_labels))[:count]:
            start = time.time()
            registration = ants.registration(fixed, moving, type_of_transform="SyN")
            transforms = registration["fwdtransforms"]
            registered["registrations"].append(registration)
            stage = time.time()
            registered["warped_labels"].append(ants.apply_transforms(
                scan, labels, transforms, interpolator="genericLabel"))
            times = {"register": stage - start, "warp_labels": time.time() - stage}
            if images:
                stage = time.time()
                registered["warped_images"].append(ants.apply_transforms(scan, atlas, transforms))
                times["warp_image"] = time.time() - stage
            seconds["atlases"].append(times)
        return registered

    def folding(self, scan, registrations) -> list:
        """The folding fraction of each registration's whole map (affine and warp composed) on
        the scan's full grid, in its non-zero voxels; removes the registrations' transform files."""
        ants = self.ants
        mask = scan.numpy() > 0
        folding = []
        for registration, moving in zip(registrations, self.moving):
            with tempfile.TemporaryDirectory() as folder:
                composed = ants.apply_transforms(scan, moving,
                                                 registration["fwdtransforms"],
                                                 compose=os.path.join(folder, "composed"))
                determinant = ants.create_jacobian_determinant_image(scan, composed).numpy()
            folding.append(float(np.mean(determinant[mask] <= 0)))
            for path in {*registration["fwdtransforms"], *registration["invtransforms"]}:
                for leftover in glob.glob(path):
                    os.remove(leftover)
        return folding

    def segment(self, image_path: str, output_path: str) -> dict:
        start = time.time()
        scan = self.ants.image_read(image_path)
        registered = self.register(scan)
        segmentation = self._fuse(scan, registered["warped_images"], registered["warped_labels"])
        _write_segmentation(segmentation, image_path, output_path)
        seconds = time.time() - start
        folding = self.folding(scan, registered["registrations"])
        return {"segmentation": segmentation, "seconds": seconds,
                "folding_fraction": float(np.mean(folding)), "folding_fractions": folding}


class AntsJointLabelFusion(_AntsAtlases):
    """``ants.joint_label_fusion`` (ANTs' antsJointFusion, Wang et al. 2013) of the SyN-warped
    atlases within the scan's non-zero voxels, with antspyx's defaults (patch radius 2, rho
    (alpha) 0.01, mean-squares search over radius ``search_radius`` 3) except beta = 2, the
    paper's and antsJointFusion's default (antspyx's is 4).

    Images go in multiplied by ``intensity_scale``: ANTs floors each patch's standard deviation at
    1 intensity unit before standardising, which on the [0, 1] intensities read from the shared
    data would leave patches unscaled and the joint errors far below alpha, i.e. weights ~ equal
    (sub-01 against sub-06 on 2 mm grids, ``ltnet_tf.registration.fusion``'s errors with that floor: median
    1e-5 against alpha 0.01; at 255, the files' stored uint8 scale, 0.5).
    The search costs (2·3 + 1)³ patch comparisons per voxel and atlas: ~160 µs per voxel and
    atlas on 2 cores (a 40³ crop of sub-06), ~6 min per atlas over a 1 mm brain's 2.3M voxels;
    ``search_radius`` 1 is ~9× cheaper. Its label probability maps go to a temporary folder.

    With ``histogram_match`` (the default), each warped atlas image is first histogram-matched to
    the scan (``ants.histogram_match_image``, inside the scan's mask), as ANTs users prepare
    atlases from another site: JLF compares intensity patches, and the MICCAI 2012 scans'
    intensities relate to the FreeSurfer atlases' non-linearly (brain median 0.62 against
    0.25-0.31). Without it, JLF on MICCAI 1000 labelled twice the white matter of the majority
    vote (Dice 0.558, bench/results/fusion.md of 2dcace4).
    """

    def __init__(self, atlas_paths, atlas_label_paths, spacing: float = None,
                 search_radius: int = 3, intensity_scale: float = 255.0,
                 histogram_match: bool = True):
        self.search_radius, self.intensity_scale = search_radius, intensity_scale
        self.histogram_match = histogram_match
        self.method = (f"ants.joint_label_fusion(beta=2, rad=2, rho=0.01, usecor=False, "
                       f"r_search={search_radius}), intensities x {intensity_scale:g}"
                       + (", atlases histogram-matched to the scan" if histogram_match else ""))
        super().__init__(atlas_paths, atlas_label_paths, spacing)

    def _fuse(self, scan, warped_images, warped_labels) -> np.ndarray:
        scale = self.intensity_scale
        mask = self.ants.get_mask(scan, low_thresh=1e-6, cleanup=0)
        if self.histogram_match:
            warped_images = [self.ants.histogram_match_image(image, scan) * mask
                             for image in warped_images]
        with tempfile.TemporaryDirectory() as folder:
            fused = self.ants.joint_label_fusion(
                scan * scale, mask, [image * scale for image in warped_images], beta=2, rad=2,
                label_list=warped_labels, rho=0.01, usecor=False, r_search=self.search_radius,
                output_prefix=os.path.join(folder, "fusion"))
            return np.rint(fused["segmentation"].numpy()).astype(np.int32)


def _majority_vote(scan, warped_labels) -> np.ndarray:
    from ltnet_tf.registration import fusion
    candidates = np.stack([np.rint(labels.numpy()).astype(np.int32).ravel()
                           for labels in warped_labels])
    return fusion.fuse_labels(candidates).reshape(scan.shape)


class AntsMajorityVote(_AntsAtlases):
    """The SyN-warped atlas labels (``genericLabel``) fused by majority vote
    (``ltnet_tf.registration.fusion.fuse_labels``: ties go to the label of the first atlas listed)."""

    method = "majority vote of the warped labels (ties: first atlas)"

    def _fuse(self, scan, warped_images, warped_labels) -> np.ndarray:
        return _majority_vote(scan, warped_labels)


class AntsAtlasFusions(AntsJointLabelFusion):
    """Each atlas registered to a scan once, and several segmentations made of those
    registrations, so that the SyN runs are paid once: ``rules`` {name: (rule, count)}, rule
    'syn' (count 1: the first atlas's warped labels, what ``AntsSyn`` gives), 'majority'
    (``AntsMajorityVote``) or 'jlf' (``AntsJointLabelFusion``, same settings) of the first
    ``count`` atlases. Other arguments as ``AntsJointLabelFusion``.

    Each segmentation's seconds are what it would take alone: reading the scan and resampling it
    (``spacing``), registering the atlases it uses and warping their labels (and, for 'jlf', their
    images), its own fusion, writing its file ('seconds_parts' gives each part).
    """

    RULES = ("syn", "majority", "jlf")

    def __init__(self, atlas_paths, atlas_label_paths, rules: dict, spacing: float = None,
                 search_radius: int = 3, intensity_scale: float = 255.0,
                 histogram_match: bool = True):
        for name, (rule, count) in rules.items():
            if rule not in self.RULES or not 1 <= count <= len(atlas_paths) or (
                    rule == "syn") != (count == 1):
                raise ValueError(f"{name}: rule {rule!r} of {count} atlases: 'syn' takes 1, "
                                 f"'majority' and 'jlf' 2..{len(atlas_paths)}")
        super().__init__(atlas_paths, atlas_label_paths, spacing, search_radius, intensity_scale,
                         histogram_match)
        self.rules = dict(rules)
        grid = f"{spacing:g} mm grids" if spacing else "the full grid"
        registration = (f"ants.registration(type_of_transform='SyN') (antspyx "
                        f"{self.ants.__version__} defaults) on {grid}, labels warped with "
                        f"genericLabel")
        fusions = {"syn": "no fusion", "majority": AntsMajorityVote.method, "jlf": self.method}
        self.descriptions = {name: f"{count} atlas{'es' if count > 1 else ''}, each by "
                                   f"{registration}; {fusions[rule]}"
                             for name, (rule, count) in self.rules.items()}

    def segment_all(self, image_path: str, output_paths: dict) -> dict:
        """One scan -> {name: {'segmentation', 'seconds', 'seconds_parts', 'folding_fraction',
        'folding_fractions'}} for every rule, each written to ``output_paths[name]``."""
        start = time.time()
        scan = self.ants.image_read(image_path)
        read = time.time() - start
        registered = self.register(scan, max(count for _, count in self.rules.values()),
                                   images=any(rule == "jlf" for rule, _ in self.rules.values()))
        per_atlas = registered["seconds"]["atlases"]
        results = {}
        for name, (rule, count) in self.rules.items():
            start = time.time()
            labels = registered["warped_labels"][:count]
            if rule == "syn":
                segmentation = np.rint(labels[0].numpy()).astype(np.int32)
            elif rule == "majority":
                segmentation = _majority_vote(scan, labels)
            else:
                segmentation = self._fuse(scan, registered["warped_images"][:count], labels)
            fuse = time.time() - start
            start = time.time()
            _write_segmentation(segmentation, image_path, output_paths[name])
            parts = {"read": read, "resample": registered["seconds"]["resample"],
                     "register": sum(a["register"] for a in per_atlas[:count]),
                     "warp": sum(a["warp_labels"] + (a["warp_image"] if rule == "jlf" else 0.0)
                                 for a in per_atlas[:count]),
                     "fuse": fuse, "write": time.time() - start}
            results[name] = {"segmentation": segmentation, "seconds": sum(parts.values()),
                             "seconds_parts": parts}
        folding = self.folding(scan, registered["registrations"])
        for name, (_, count) in self.rules.items():
            results[name].update(folding_fraction=float(np.mean(folding[:count])),
                                 folding_fractions=folding[:count])
        return results


class Product:
    """The product's own per-scan pipeline (``ltnet_tf.prediction.predictor.Predictor``), as predict.py runs
    it on a scan on the atlas grid: a run folder's G_F (``model_dir``) or none (registration from
    the identity), refined with ``refinement`` (a ``RefinementSettings``) or not (network alone),
    one atlas or several (``atlases``: [(image path, label path)], fused with ``fusion``)."""

    def __init__(self, model_dir: str = None, refinement=None, atlases=None,
                 fusion: str = "jlf"):
        from ltnet_tf.prediction import cohort, predictor as prediction, sources

        start = time.time()
        network = None if model_dir is None else sources.RunFolderNetwork(model_dir)
        atlas_set, _ = cohort.load_atlases(
            model_dir, [p for p, _ in atlases or []] or None, [p for _, p in atlases or []] or None)
        self.predictor = prediction.Predictor(atlas_set, network, refinement=refinement,
                                              fusion_method=fusion)
        self.checkpoint = None if network is None else network.source
        self.description = self._describe(network, atlas_set, refinement, fusion)
        # One untimed scan (the primary atlas itself): tracing and XLA compilation are paid once
        # per process, as a served model or a cohort run pays them once.
        self.predictor.segment(atlas_set.primary.image)
        self.load_seconds = time.time() - start

    @staticmethod
    def _describe(network, atlas_set, refinement, fusion) -> str:
        start = ("G_F of a run folder (" + os.path.basename(network.source) + ")"
                 if network is not None else "no network (identity start)")
        refined = ("network alone" if refinement is None else
                   f"refined {refinement.coarse_steps} steps at grid / {refinement.coarse_factor or 'working'}"
                   f", then {refinement.steps} at / {refinement.factor}")
        atlases = (f"; {len(atlas_set)} atlases fused by {fusion}" if len(atlas_set) > 1 else "")
        return f"{start}, {refined}{atlases}"

    def segment(self, image_path: str, output_path: str) -> dict:
        start = time.time()
        scan = data.load_scan(image_path)
        result = self.predictor.segment(scan)
        data.save_nifti(result["segmentation"], scan.affine, output_path, header=scan.header)
        seconds = time.time() - start
        displacement = result["displacement"]
        if displacement is None:  # the network alone segmented in one call: its displacement
            from ltnet_tf.registration.transfer import Displacement

            network = self.predictor.network
            displacement = Displacement([(network.working_displacement(scan)[None],
                                          network.config.downsample)])
        flow = displacement.full_grid(scan.shape)[0].numpy()
        refinement = result.get("refinement")
        return {"segmentation": result["segmentation"], "seconds": seconds,
                "stage_seconds": dict(result["seconds"]),
                "folding_fraction": evaluation.folding_fraction(flow, scan.data > 0),
                **({"refinement_loss": {"loss_start": refinement["loss_start"][0],
                                        "loss": refinement["loss"][0]}} if refinement else {})}
