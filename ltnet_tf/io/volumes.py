"""NIfTI/MGZ in and out (header affine kept), input checks, intensity normalisation, padding, the
working grid and one-hot atlas labels.

Every bad input raises ``DataError`` with a one-line message that names the file, so the command-line
tools can print it as is. The TensorFlow functions use only standard ops on [batch, D, H, W, C]
tensors because they run inside training, inference and the exported SavedModel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import nibabel as nib
import numpy as np
from absl import logging

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)
from ltnet_tf.errors import DataError  # noqa: F401  (raised here; part of this module's API)
from ltnet_tf.files import atomic_path
import tensorflow as tf  # noqa: E402

from ltnet_tf.io import headers, intensity, nonfinite  # noqa: E402
from ltnet_tf.io.file_warnings import warn_once  # noqa: E402

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz")
AFFINE_TOLERANCE = 1e-3
MIN_AXIS_VOXELS = 4  # fewer along any axis: a 2D image or a single slice, not a volume


@dataclass
class Volume:
    data: np.ndarray
    affine: np.ndarray
    path: str
    header: Any = None  # the source header, so outputs can be written with the scan's own header
    header_conflict: Optional[headers.HeaderConflict] = None  # the file's sform and qform disagree
    _normalized: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    def normalized_data(self) -> np.ndarray:
        """``intensity.normalize_array(self.data)`` once per Volume (checks, head test, alignment
        each use it; data is never changed in place: a changed scan is a new Volume)."""
        if self._normalized is None:
            self._normalized = intensity.normalize_array(self.data)
        return self._normalized


# --------------------------------------------------------------------------------------- file names
def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


# Formats people hold brain scans in that are not read here, and how to convert them.
OTHER_FORMATS = {".dcm": "DICOM: convert with dcm2niix",
                 ".ima": "DICOM: convert with dcm2niix",
                 ".hdr": "Analyze: convert with FreeSurfer mri_convert or nibabel",
                 ".img": "Analyze: convert with FreeSurfer mri_convert or nibabel",
                 ".nrrd": "NRRD: convert with SimpleITK or 3D Slicer",
                 ".nhdr": "NRRD: convert with SimpleITK or 3D Slicer",
                 ".mha": "MetaImage: convert with SimpleITK",
                 ".mhd": "MetaImage: convert with SimpleITK",
                 ".mnc": "MINC: convert with mnc2nii"}


def _not_an_image(path: str) -> str:
    """The message for a file that is not a NIfTI/MGZ by its name, naming its format if known."""
    extension = os.path.splitext(path.lower().removesuffix(".gz"))[1]
    known = OTHER_FORMATS.get(extension)
    return (f"{path}: not a NIfTI/MGZ image (expected .nii, .nii.gz or .mgz"
            + (f"; this looks like {known})" if known else ")"))


def _folder_contents(path: str) -> str:
    """What a folder without NIfTI/MGZ images holds, for the message."""
    names = [n for n in os.listdir(path) if not n.startswith(".")]
    extensions = [os.path.splitext(n.lower().removesuffix(".gz"))[1] for n in names]
    known = {OTHER_FORMATS[e] for e in extensions if e in OTHER_FORMATS}
    if known:
        return f"it holds {len(names)} files of another format ({'; '.join(sorted(known))})"
    if names and all(e == "" for e in extensions):
        return f"it holds {len(names)} files without extension (DICOM? convert with dcm2niix)"
    return "it is empty" if not names else f"it holds {len(names)} other files"


def scan_name(path: str) -> str:
    """The file name without its image extension: ``/x/sub-01.nii.gz`` -> ``sub-01``."""
    name = os.path.basename(os.fspath(path))
    for extension in IMAGE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def split_paths(paths) -> list:
    """A path, a list of paths or a comma-separated string of them -> a list of paths."""
    if isinstance(paths, (str, os.PathLike)):
        path = os.fspath(paths)
        # A comma-separated list, unless the string itself names an existing path.
        if "," in path and not os.path.exists(path):
            return [p.strip() for p in path.split(",") if p.strip()]
        return [path]
    return [os.fspath(p) for p in paths]


def list_images(paths) -> list:
    """Expand a folder, a file, a list of them or a comma-separated string into image files.

    Folders give their sorted ``.nii``/``.nii.gz``/``.mgz`` files; hidden files (such as the temporary
    files of ``save_nifti``) and other files in a folder are skipped.
    """
    images = []
    for path in split_paths(paths):
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name) for name in os.listdir(path)
                if not name.startswith(".") and _has_image_extension(name)
                and os.path.isfile(os.path.join(path, name)))
            if not found:
                raise DataError(f"{path}: no NIfTI/MGZ images in folder ({_folder_contents(path)})")
            images.extend(found)
        elif not os.path.exists(path):
            raise DataError(f"{path}: file not found")
        elif not _has_image_extension(path):
            raise DataError(_not_an_image(path))
        else:
            images.append(path)
    if not images:
        raise DataError("no image files given")
    return images


# --------------------------------------------------------------------------------------- loading
def _load_image(path) -> nib.spatialimages.SpatialImage:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path) or not _has_image_extension(path):
        raise DataError(_not_an_image(path))
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: is empty (0 bytes): an interrupted copy or download?")
    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DataError(_unreadable(path, e)) from None


def _unreadable(path: str, error: Exception) -> str:
    """One line for a file nibabel could not read; a cut-off file is named as such."""
    reason = f"{type(error).__name__}: {error}".replace("\n", " ")
    if isinstance(error, EOFError) or "ended before" in str(error) or "truncat" in str(error):
        return (f"{path}: is truncated ({reason}; {os.path.getsize(path)} bytes): an interrupted "
                f"copy or download?")
    return f"{path}: not a NIfTI/MGZ image ({reason})"


def load_grid(path) -> tuple:
    """(shape, affine) of an image file without reading its voxels (DataError if unreadable)."""
    image = _load_image(path)
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def _as_3d(data: np.ndarray, path: str) -> np.ndarray:
    """Squeeze trailing singleton dimensions (4D/5D NIfTI with one frame) or reject the volume."""
    shape = data.shape
    if len(shape) < 3:
        raise DataError(f"{path}: is {len(shape)}D with shape {shape}; expected a 3D volume")
    if any(s != 1 for s in shape[3:]):
        if len(shape) == 4:
            raise DataError(f"{path}: is 4D with {shape[3]} frames; expected a 3D volume (a time "
                            f"series, multi-echo or diffusion scan? give one frame, e.g. "
                            f"fslroi IN OUT 0 1)")
        raise DataError(f"{path}: is {len(shape)}D with shape {shape}; expected a 3D volume"
                        + (" (a vector or RGB image?)" if len(shape) == 5 else ""))
    if min(shape[:3]) < MIN_AXIS_VOXELS:
        raise DataError(f"{path}: has only {min(shape[:3])} voxel(s) along an axis (shape "
                        f"{shape[:3]}): a 2D image or a single slice; expected a 3D volume")
    return data.reshape(shape[:3])


def _read_data(image, path: str, dtype=np.float32) -> np.ndarray:
    """The voxel values as ``dtype``, or in the file's own dtype (scaling applied) when None."""
    try:
        if dtype is None:
            return np.asanyarray(image.dataobj)
        return image.get_fdata(dtype=dtype)
    except Exception as e:  # truncated or corrupt file
        raise DataError(_unreadable(path, e)) from None


def _header_conflict(image, path: str) -> Optional[headers.HeaderConflict]:
    """The file's sform/qform disagreement, reported in one warning line the first time only (a
    scan is often read more than once: checked first, then segmented; ``file_warnings``)."""
    conflict = headers.find_conflict(image)
    if conflict is not None:
        warn_once("header_conflict", path, "%s: %s; %s", path, conflict.describe(),
                  conflict.fix(path))
    return conflict


def load_scan(path) -> Volume:
    """Read a scan as float32; reject what no registration could use (NaN, empty, constant)."""
    path = os.fspath(path)
    image = _load_image(path)
    data = _as_3d(_read_data(image, path, np.float32), path)
    if data.size == 0:
        raise DataError(f"{path}: is empty/constant (it has no voxels, shape {data.shape})")
    data = nonfinite.background_or_refused(data, path)  # NaN outside the brain: background
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise DataError(f"{path}: is empty/constant (every voxel is {low:g})"
                        + (": a mask that removed everything, or a failed conversion?"
                           if low == 0 else ""))
    # C order (nibabel's is Fortran's): one transposing copy here, none at later steps (0.15 s each).
    data = np.ascontiguousarray(data)
    return Volume(data=data, affine=np.asarray(image.affine, dtype=np.float64), path=path,
                  header=image.header, header_conflict=_header_conflict(image, path))


def load_label_map(path) -> Volume:
    """Read a label map as int32 label IDs; non-integer values mean the file is not a label map."""
    path = os.fspath(path)
    image = _load_image(path)
    raw = _as_3d(_read_data(image, path, dtype=None), path)  # native dtype, scaling applied
    if raw.size == 0:
        raise DataError(f"{path}: is empty (it has no voxels, shape {raw.shape})")
    if raw.dtype.kind not in "iub":
        raw = raw.astype(np.float64, copy=False)
        nonfinite.refuse_any(raw, path)
        n_fractional = int(np.count_nonzero(raw != np.round(raw)))
        if n_fractional:
            raise DataError(f"{path}: label values are not integers ({n_fractional} voxels have "
                            "fractional values; is this an image rather than a label map?)")
    info = np.iinfo(np.int32)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise DataError(f"{path}: label values do not fit in int32")
    labels = np.ascontiguousarray(raw, dtype=np.int32)  # C order, as load_scan
    if not np.any(labels):
        raise DataError(f"{path}: label map has no non-zero labels")
    return Volume(data=labels, affine=np.asarray(image.affine, dtype=np.float64), path=path,
                  header=image.header, header_conflict=_header_conflict(image, path))


def check_same_grid(reference: Volume, other: Volume, *, strict: bool) -> None:
    """Shapes must match; a different affine is an error only when ``strict``, else a warning.
    Both messages say how the grids differ (axis order, voxel sizes, orientation, position)."""
    if tuple(reference.shape) != tuple(other.shape):
        hint = ("; the same sizes in another axis order: was one of the two reoriented (e.g. "
                "fslreorient2std) and not the other?"
                if sorted(reference.shape) == sorted(other.shape) else "")
        raise DataError(f"{other.path}: shape {tuple(other.shape)} differs from the shape "
                        f"{tuple(reference.shape)} of {reference.path}{hint}")
    difference = float(np.max(np.abs(np.asarray(reference.affine) - np.asarray(other.affine))))
    if difference > AFFINE_TOLERANCE:
        message = (f"{other.path}: header affine differs from that of {reference.path} by up to "
                   f"{difference:.4g} ({headers.how_affines_differ(reference.affine, other.affine)})")
        if strict:
            raise DataError(message)
        logging.warning("%s; assuming the scan is affinely pre-aligned to the atlas (voxel grids "
                        "correspond); the output uses the scan's own header", message)


# --------------------------------------------------------------------------------------- saving
def _output_dtype(data: np.ndarray, dtype):
    if dtype is not None:
        return np.dtype(dtype)
    if data.dtype.kind in "iub":  # a label map
        if data.size == 0:
            return np.dtype(np.int16)
        low, high = int(data.min()), int(data.max())
        info = np.iinfo(np.int16)
        return np.dtype(np.int16 if info.min <= low and high <= info.max else np.int32)
    return np.dtype(np.float32)


def _fortran_order(data: np.ndarray, dtype) -> np.ndarray:
    """``data`` as ``dtype`` in NIfTI's Fortran order, copied by slabs (nibabel's own is slower)."""
    if data.ndim < 2 or data.flags["F_CONTIGUOUS"] or not data.flags["C_CONTIGUOUS"]:
        return data.astype(dtype, copy=False)
    out = np.empty(data.shape, dtype, order="F")
    for start in range(0, data.shape[0], 16):
        out[start:start + 16] = data[start:start + 16]
    return out


def save_nifti(data: np.ndarray, affine: np.ndarray, path, *, header=None, dtype=None) -> None:
    """Write a NIfTI atomically (temporary file then rename) so a crash never leaves half a file.

    Integer data (label maps) is stored as int16 when it fits, else int32; float data as float32.
    """
    path = os.fspath(path)
    lower = path.lower()
    if not lower.endswith((".nii.gz", ".nii")):
        raise DataError(f"{path}: output file name must end in .nii or .nii.gz")
    data = np.asarray(data)
    out_dtype = _output_dtype(data, dtype)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"{folder}: cannot create output folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"{folder}: output folder is not writable")

    image = nib.Nifti1Image(_fortran_order(data, out_dtype), np.asarray(affine, np.float64),
                            header=header)
    image.set_data_dtype(out_dtype)
    try:
        with atomic_path(path) as tmp_path:
            nib.save(image, tmp_path)
    except OSError as e:
        raise DataError(f"{folder}: cannot write {os.path.basename(path)} ({e.strerror or e})") \
            from None


# --------------------------------------------------------------------------------------- label IDs
def labels_to_indices(label_map: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """Map label IDs to their position in ``label_ids`` (0 = background); unknown IDs become 0."""
    label_ids = np.asarray(label_ids, dtype=np.int64)
    if label_ids.size == 0 or label_ids[0] != 0:
        raise ValueError(f"label_ids must start with 0 (background), got {label_ids.tolist()[:5]}")
    label_map = np.asarray(label_map)
    order = np.argsort(label_ids, kind="stable")
    sorted_ids = label_ids[order]
    position = np.clip(np.searchsorted(sorted_ids, label_map), 0, len(sorted_ids) - 1)
    known = sorted_ids[position] == label_map
    return np.where(known, order[position], 0).astype(np.int32)


def indices_to_labels(indices: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """The inverse of ``labels_to_indices``: positions back to label IDs."""
    return np.asarray(label_ids, dtype=np.int32)[np.asarray(indices)]


# --------------------------------------------------------------------------------------- TF graph ops
def normalize_intensity(scan: tf.Tensor) -> tf.Tensor:
    """[B, D, H, W, C] -> float32 in [0, 1], per scan: the 0.5th and 99.5th percentiles of its
    non-background voxels to 0 and 1, clipped, the background exactly 0 (``ltnet_tf.io.intensity``, which
    says what counts as background); a constant or all-zero scan gives zeros rather than NaN."""
    return intensity.normalize(scan)


def pad_to_shape(volume: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Zero-pad the end of each spatial axis, so voxel (0, 0, 0) and the affine stay put."""
    volume = tf.convert_to_tensor(volume)
    spatial = volume.shape[1:-1].as_list()
    if any(s is None for s in spatial):
        raise ValueError(f"pad_to_shape needs static spatial shapes, got {volume.shape}")
    if any(s > t for s, t in zip(spatial, shape)) or len(spatial) != len(shape):
        raise ValueError(f"cannot pad spatial shape {tuple(spatial)} to {tuple(shape)}")
    if tuple(spatial) == tuple(shape):
        return volume
    paddings = [[0, 0]] + [[0, int(t) - int(s)] for s, t in zip(spatial, shape)] + [[0, 0]]
    return tf.pad(volume, paddings)


def to_working_grid(volume: tf.Tensor, config) -> tf.Tensor:
    """Pad to the U-Net-divisible grid, then average-pool by ``config.downsample``.

    On one-hot label maps the pooling gives the fraction of each label in a working voxel.
    """
    volume = tf.convert_to_tensor(volume)
    spatial = volume.shape[1:-1].as_list()
    volume = pad_to_shape(volume, config.padded_shape(spatial))
    factor = int(config.downsample)
    if factor == 1:
        return volume
    return tf.nn.avg_pool3d(volume, ksize=factor, strides=factor, padding="VALID")


def preprocess_scan(data: np.ndarray, config) -> np.ndarray:
    """One full-resolution scan [D, H, W] -> the network input [*working_shape, 1] float32."""
    scan = tf.convert_to_tensor(np.asarray(data, dtype=np.float32)[None, ..., None])
    return to_working_grid(normalize_intensity(scan), config)[0].numpy()


def atlas_onehot_working(label_indices: np.ndarray, n_labels: int, config) -> np.ndarray:
    """The atlas one-hot labels at working resolution [*working_shape, L] (soft label fractions).

    Padding counts as background, so the fractions sum to 1 in every working voxel. Labels are
    pooled ``config.label_chunk`` at a time so memory is never n_labels full volumes.
    """
    label_indices = np.asarray(label_indices)
    padded = np.zeros(config.padded_shape(label_indices.shape), dtype=np.int32)
    padded[tuple(slice(0, s) for s in label_indices.shape)] = label_indices
    padded = tf.convert_to_tensor(padded[None])
    chunk = max(1, int(getattr(config, "label_chunk", 16)))
    fractions = []
    for start in range(0, n_labels, chunk):
        channels = tf.range(start, min(start + chunk, n_labels), dtype=tf.int32)
        onehot = tf.cast(tf.equal(padded[..., None], channels), tf.float32)
        fractions.append(to_working_grid(onehot, config)[0].numpy())
    return np.concatenate(fractions, axis=-1)
