"""QC pictures: real NIfTI phantoms in several voxel orders, drawn and read back as pixels."""
import os

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.io import volumes as data
from ltnet_tf.reporting import qc

BODY, LEFT, SUPERIOR, ANTERIOR = 1, 2, 3, 4
COLOURS = {BODY: (0, 255, 0), LEFT: (255, 0, 0), SUPERIOR: (0, 0, 255), ANTERIOR: (255, 0, 255)}
DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
              "S": (0, 0, 1), "I": (0, 0, -1)}


def grid_affine(codes: str, zooms, shape, tilt_degrees: float = 0.0) -> np.ndarray:
    """Voxel -> world RAS affine with voxel axes along ``codes`` (e.g. "LIA"), centred on 0."""
    columns = np.array([DIRECTIONS[c] for c in codes], float).T * np.asarray(zooms, float)
    angle = np.radians(tilt_degrees)  # about the world's A axis
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0],
                         [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ columns
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def write_phantom(folder, codes, zooms=(2.0, 2.0, 2.0), shape=(32, 32, 32), tilt_degrees=0.0):
    """A ball (label BODY) with slabs at the subject's left, top and front, defined in world mm
    through the header, so the voxel order changes the file and nothing of the anatomy."""
    affine = grid_affine(codes, zooms, shape, tilt_degrees)
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    x, y, z = np.moveaxis(voxels @ affine[:3, :3].T + affine[:3, 3], -1, 0)  # world R, A, S
    radius = 0.42 * min(np.asarray(shape) * np.asarray(zooms))
    labels = np.zeros(shape, np.int16)
    labels[x ** 2 + y ** 2 + z ** 2 < radius ** 2] = BODY
    near = 0.35 * radius  # slabs extend this far along the other axes, through the slice centre
    labels[(x < -0.55 * radius) & (x > -radius) & (abs(y) < near) & (abs(z) < near)] = LEFT
    labels[(z > 0.55 * radius) & (z < radius) & (abs(x) < near) & (abs(y) < near)] = SUPERIOR
    labels[(y > 0.55 * radius) & (y < radius) & (abs(x) < near) & (abs(z) < near)] = ANTERIOR
    scan = np.where(labels > 0, 100.0 + 10 * (x / radius), 0.0).astype(np.float32)
    scan_path = os.path.join(folder, f"scan_{codes}.nii.gz")
    labels_path = os.path.join(folder, f"labels_{codes}.nii.gz")
    nib.save(nib.Nifti1Image(scan, affine), scan_path)
    nib.save(nib.Nifti1Image(labels, affine), labels_path)
    return data.load_scan(scan_path), data.load_label_map(labels_path)


def pixels_of(picture: np.ndarray, colour) -> np.ndarray:
    """(row, column) of the pixels that have exactly this colour (0-255)."""
    rgb = np.round(picture[..., :3] * 255).astype(int)
    return np.argwhere(np.all(rgb == np.asarray(colour), axis=-1))


def panels(picture: np.ndarray, colour=COLOURS[BODY]) -> list:
    """Column ranges of the three outline panels, found from the pixels of a label's outline."""
    columns = np.unique(pixels_of(picture, colour)[:, 1])
    breaks = np.flatnonzero(np.diff(columns) > 10)
    starts = np.r_[columns[0], columns[breaks + 1]]
    ends = np.r_[columns[breaks], columns[-1]]
    assert len(starts) == 3, f"expected 3 panels, found column ranges {list(zip(starts, ends))}"
    return [(start - 5, end + 5) for start, end in zip(starts, ends)]


def centroid_in(picture, colour, columns):
    found = pixels_of(picture, colour)
    inside = found[(found[:, 1] >= columns[0]) & (found[:, 1] <= columns[1])]
    return inside.mean(axis=0) if len(inside) else None


def draw(tmp_path, scan, labels, name="qc.png", **kwargs):
    path = qc.save_scan_qc_png(scan, labels.data, str(tmp_path / name), **kwargs)
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("codes, zooms, tilt", [
    ("LIA", (2.0, 2.0, 2.0), 0.0),         # FreeSurfer's conformed order
    ("RAS", (2.0, 2.0, 2.0), 0.0),
    ("LPS", (2.0, 2.0, 2.0), 0.0),         # DICOM's order
    ("LAS", (2.4, 1.6, 2.0), 0.0),         # anisotropic voxels
    ("PSR", (2.0, 2.0, 2.0), 12.0),        # axes permuted and tilted: the nearest orientation
])
def test_anatomy_lands_on_the_labelled_side(tmp_path, codes, zooms, tilt):
    shape = tuple(int(round(64 / z)) for z in zooms)
    scan, labels = write_phantom(str(tmp_path), codes, zooms, shape, tilt)
    picture = draw(tmp_path, scan, labels, colours=COLOURS)
    axial, coronal, sagittal = panels(picture)
    row, column = 0, 1
    # neurological view: the subject's left on the left of the picture, anterior and superior up
    body = centroid_in(picture, COLOURS[BODY], axial)
    assert centroid_in(picture, COLOURS[LEFT], axial)[column] < body[column] - 5
    assert centroid_in(picture, COLOURS[ANTERIOR], axial)[row] < body[row] - 5
    assert centroid_in(picture, COLOURS[SUPERIOR], axial) is None
    body = centroid_in(picture, COLOURS[BODY], coronal)
    assert centroid_in(picture, COLOURS[LEFT], coronal)[column] < body[column] - 5
    assert centroid_in(picture, COLOURS[SUPERIOR], coronal)[row] < body[row] - 5
    assert centroid_in(picture, COLOURS[ANTERIOR], coronal) is None
    # sagittal: anterior on the left, superior up
    body = centroid_in(picture, COLOURS[BODY], sagittal)
    assert centroid_in(picture, COLOURS[ANTERIOR], sagittal)[column] < body[column] - 5
    assert centroid_in(picture, COLOURS[SUPERIOR], sagittal)[row] < body[row] - 5
    assert centroid_in(picture, COLOURS[LEFT], sagittal) is None


def test_anisotropic_voxels_keep_a_ball_round(tmp_path):
    zooms = (3.0, 1.5, 2.0)  # the ball is 2x as many voxels along A as along R
    shape = tuple(int(round(64 / z)) for z in zooms)
    scan, labels = write_phantom(str(tmp_path), "RAS", zooms, shape)
    picture = draw(tmp_path, scan, labels, colours=COLOURS)
    for columns in panels(picture):
        found = np.concatenate([pixels_of(picture, c) for c in COLOURS.values()])
        found = found[(found[:, 1] >= columns[0]) & (found[:, 1] <= columns[1])]
        height, width = np.ptp(found, axis=0) + 1
        assert abs(width / height - 1) < 0.1, f"ball drawn {width} x {height} pixels"


def test_outlines_colour_the_boundary_not_the_interior(tmp_path):
    shape, affine = (24, 24, 24), np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros(shape, np.int16)
    labels[6:18, 6:18, 6:18] = 7
    scan = np.where(labels > 0, 50.0, 0.0).astype(np.float32)
    volume = data.Volume(data=scan, affine=affine, path="cube.nii.gz")
    path = qc.save_scan_qc_png(volume, labels, str(tmp_path / "cube.png"))  # default colours
    picture = matplotlib.image.imread(path)
    ring = pixels_of(picture, qc.label_colour(7))
    assert len(ring) > 0, "the label's default colour is nowhere in the picture"
    for columns in panels(picture, qc.label_colour(7)):
        square = ring[(ring[:, 1] >= columns[0]) & (ring[:, 1] <= columns[1])]
        (top, left), (bottom, right) = square.min(axis=0), square.max(axis=0)
        assert len(square) < 0.35 * (bottom - top + 1) * (right - left + 1), "filled, not outlined"
        for side in (square[:, 0] == top, square[:, 0] == bottom, square[:, 1] == left,
                     square[:, 1] == right):
            assert side.sum() > 0.8 * min(bottom - top, right - left), "a side of the outline gone"
        centre = picture[(top + bottom) // 2, (left + right) // 2, :3]
        assert np.ptp(centre) < 1e-6 and centre[0] > 0.3, f"interior is not plain grey: {centre}"
        # the second row fills the labels, blended with the scan
        below = picture[bottom + 5:, left:right + 1, :3]
        assert (np.ptp(below, axis=-1) > 0.1).any(), "no filled labels in the second row"


def test_label_boundaries_are_the_inner_edge_of_each_label():
    labels = np.zeros((7, 7), int)
    labels[1:6, 1:6] = 3
    labels[2:5, 4:6] = 5
    edge = qc.label_boundaries(labels)
    assert not edge[0].any() and not edge[3, 2]        # background and the interior of label 3
    assert edge[1, 1] and edge[5, 3]                    # its outer edge
    assert edge[3, 3] and edge[3, 4] and edge[3, 5]     # both sides where labels 3 and 5 meet
    assert not (edge & (labels == 0)).any()


def test_contrast_ignores_a_few_extreme_voxels():
    rng = np.random.default_rng(0)
    scan = np.zeros((32, 32, 32), np.float32)
    scan[4:28, 4:28, 4:28] = rng.normal(100, 10, (24, 24, 24))
    scan[10, 10, 10] = 1e6   # e.g. a hot voxel at a vessel or an artefact
    low, high = qc.display_range(scan)
    assert 60 < low < 90 and 110 < high < 140, (low, high)


def test_default_colours_are_fixed_per_label_and_distinct_for_neighbours():
    assert qc.label_colour(17) == qc.label_colour(17)
    colours = [qc.label_colour(i) for i in range(1, 64)]
    for first, second in zip(colours, colours[1:]):
        assert np.abs(np.subtract(first, second)).max() > 60, (first, second)


def test_written_atomically_and_errors_name_the_scan(tmp_path):
    scan, labels = write_phantom(str(tmp_path), "RAS", shape=(20, 20, 20))
    with pytest.raises(ValueError, match="scan_RAS.nii.gz: segmentation shape"):
        qc.save_scan_qc_png(scan, labels.data[:-1], str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()
    path = qc.save_scan_qc_png(scan, labels.data, str(tmp_path / "qc.png"), title="t",
                               warnings=["alignment looks wrong"])
    assert path == str(tmp_path / "qc.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_empty_segmentation_still_shows_the_scan(tmp_path):
    scan, labels = write_phantom(str(tmp_path), "LPS", shape=(20, 20, 20))
    picture = draw(tmp_path, scan, data.Volume(np.zeros_like(labels.data), labels.affine, "x"))
    assert picture.shape[0] > 100 and (picture[..., :3] > 0.5).any()
