"""Quality-control pictures: a scan with the outlines of its segmentation, for checking by eye.

Volumes are only as trustworthy as the boundaries they come from, and a neuroimager checks those by
eye (FastSurfer writes QC snapshots for this, fMRIPrep an HTML report). The picture shows three
orthogonal slices on the scan's OWN voxel grid - nothing is resampled, so what is seen is what was
segmented - with the voxel axes only reordered and flipped (``nibabel.orientations``) into the
closest RAS orientation, so that every scan is shown the same way whatever its voxel order (LIA
FreeSurfer volumes, LAS, RAS, LPS; an oblique scan in its closest orientation). Pixels keep the
voxels' physical aspect ratio.

Display convention: NEUROLOGICAL (the subject's left on the left of the picture, as in nilearn and
fMRIPrep reports, FSLeyes' default); sagittal slices have anterior on the left. Every panel is
lettered (L/R, A/P, S/I) so that nobody has to remember this.
"""
from __future__ import annotations

import colorsys
import os
import textwrap
from typing import TYPE_CHECKING, Sequence

import nibabel as nib
import numpy as np
# Figure + the Agg canvas, not pyplot: no global backend switched, no figure left open.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nibabel import affines, orientations
from PIL import Image  # matplotlib's own dependency
from scipy import ndimage

from ltnet_tf.files import atomic_path

if TYPE_CHECKING:  # ltnet_tf.io.volumes imports TensorFlow; drawing a picture must not
    from ltnet_tf.io.volumes import Volume

CONVENTION = "neurological view: the subject's left on the left; sagittal: anterior on the left"
CONTRAST_PERCENTILES = (0.5, 99.5)  # of the nonzero voxels: a few extreme voxels do not wash it out
FILL_ALPHA = 0.45
BRAIN_MASK_COLOUR = (1.0, 0.85, 0.0)  # yellow: the brain mask of a whole head
PIXELS_PER_VOXEL = 1.6  # outlines one voxel wide stay visible (and the PNG ~100-200 KB for 256^3)
MIN_PANEL_PIXELS = 300  # a small volume (a 32^3 test, a low-resolution scan) is enlarged to see it
MAX_PANEL_PIXELS = 520  # a 0.5 mm scan is drawn at less than one pixel per voxel rather than huge
FILL_ROW_SCALE = 0.5    # the second row (filled labels) is a small reminder, not for reading edges
_SUBSAMPLE = 2          # centre of mass and percentiles on every 2nd voxel: 8x faster, same picture


def label_colour(label_id: int) -> tuple:
    """A saturated RGB colour (0-255) for a label ID, the same in every picture: hues stepped by the
    golden ratio, so that neighbouring IDs (left/right structures, adjacent aseg IDs) differ."""
    hue = (int(label_id) * 0.618033988749895) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


# ------------------------------------------------------------------------------------ orientation
def to_ras_grid(values: np.ndarray, affine: np.ndarray) -> tuple:
    """Reorder/flip voxel axes into the closest RAS order (a view; no resampling).

    Returns (values [R, A, S], voxel sizes in mm along R, A, S, the orientation matrix
    ``ornt_transform`` used, so voxel indices can be mapped with ``ras_index``).
    """
    scan_ornt = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(scan_ornt, orientations.axcodes2ornt("RAS"))
    zooms = np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))
    ras_zooms = np.empty(3)
    ras_zooms[transform[:, 0].astype(int)] = zooms
    return orientations.apply_orientation(values, transform), ras_zooms, transform


def ras_index(voxel: Sequence[int], shape: Sequence[int], transform: np.ndarray) -> tuple:
    """Where voxel (i, j, k) of the scan lands on the grid made by ``to_ras_grid``."""
    ras = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(transform.astype(int)):
        ras[new_axis] = shape[axis] - 1 - voxel[axis] if flip < 0 else voxel[axis]
    return tuple(int(v) for v in ras)


# ------------------------------------------------------------------------------------ what to show
def slice_centre(scan: np.ndarray, segmentation: np.ndarray) -> tuple:
    """Voxel (i, j, k) at the centre of mass of the labelled region, else of the nonzero scan
    (the brain of a skull-stripped scan), else the middle of the volume."""
    step = _SUBSAMPLE
    for mask in (segmentation[::step, ::step, ::step] != 0, scan[::step, ::step, ::step] != 0):
        if mask.any():
            centre = ndimage.center_of_mass(mask)
            return tuple(min(int(round(c * step)), n - 1) for c, n in zip(centre, scan.shape))
    return tuple(n // 2 for n in scan.shape)


def display_range(scan: np.ndarray) -> tuple:
    """(low, high) grey levels: percentiles of the nonzero voxels (all voxels if none is zero)."""
    values = scan[::_SUBSAMPLE, ::_SUBSAMPLE, ::_SUBSAMPLE]
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(nonzero, CONTRAST_PERCENTILES))
    if high <= low:  # (almost) two-valued scans, such as a binary phantom
        low, high = float(min(nonzero.min(), 0)), float(nonzero.max())
    return low, (high if high > low else low + 1.0)


def _views(scan_ras, labels_ras, centre_ras, zooms) -> list:
    """(name, grey slice, label slice, pixel height/width, edge letters L, R, top, bottom) for the
    axial, coronal and sagittal slices, as arrays in display order (row 0 at the top)."""
    i, j, k = centre_ras
    zr, za, zs = zooms
    # [R, A] -> rows A (anterior up), columns R (left on the left)
    axial = (scan_ras[:, :, k].T[::-1], labels_ras[:, :, k].T[::-1])
    coronal = (scan_ras[:, j, :].T[::-1], labels_ras[:, j, :].T[::-1])
    # [A, S] -> rows S (superior up), columns A reversed (anterior on the left)
    sagittal = (scan_ras[i, :, :].T[::-1, ::-1], labels_ras[i, :, :].T[::-1, ::-1])
    return [("axial", *axial, za / zr, "LRAP"), ("coronal", *coronal, zs / zr, "LRSI"),
            ("sagittal", *sagittal, zs / za, "APSI")]


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the labelled pixels that touch (4-neighbourhood) a different label or the
    background: the outline of every structure, one pixel wide, inside the structure."""
    padded = np.pad(labels, 1, mode="constant")
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (labels != 0)


def _label_rgb(labels: np.ndarray, colours: dict | None) -> np.ndarray:
    """[H, W, 3] float RGB (0-1) of each pixel's label colour."""
    ids, inverse = np.unique(labels, return_inverse=True)
    palette = np.array([(colours or {}).get(int(i)) or label_colour(i) for i in ids], float) / 255
    return palette[inverse.reshape(labels.shape)]


def _grey_rgb(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    level = np.clip((grey.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return np.repeat(level[..., None], 3, axis=-1)


def outline_image(grey, labels, low, high, colours=None) -> np.ndarray:
    """[H, W, 3] RGB (0-1): the grey slice with each label's boundary pixels in its colour."""
    rgb = _grey_rgb(grey, low, high)
    boundary = label_boundaries(labels)
    rgb[boundary] = _label_rgb(labels, colours)[boundary]
    return rgb


def fill_image(grey, labels, low, high, colours=None) -> np.ndarray:
    """[H, W, 3] RGB (0-1): the grey slice with labels filled, semi-transparent."""
    rgb = _grey_rgb(grey, low, high)
    inside = labels != 0
    rgb[inside] = (1 - FILL_ALPHA) * rgb[inside] + FILL_ALPHA * _label_rgb(labels, colours)[inside]
    return rgb


# ------------------------------------------------------------------------------------ the figure
def _panel_sizes(views, zooms) -> tuple:
    """Physical (width, height) in mm of each panel, and the pixels per mm of the figure."""
    sizes = [(v[1].shape[1] * w, v[1].shape[0] * h) for v, (w, h) in
             zip(views, ((zooms[0], zooms[1]), (zooms[0], zooms[2]), (zooms[1], zooms[2])))]
    largest = max(max(size) for size in sizes)
    pixels_per_mm = max(PIXELS_PER_VOXEL / float(min(zooms)), MIN_PANEL_PIXELS / largest)
    return sizes, min(pixels_per_mm, MAX_PANEL_PIXELS / largest)


def _letter(ax, text, x, y, ha, va):
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9,
            fontweight="bold", bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))


def _draw_panel(figure, rect, rgb, aspect, letters, caption=None, interpolation="nearest"):
    ax = figure.add_axes(rect)
    ax.imshow(rgb, aspect=aspect, interpolation=interpolation)
    ax.set_axis_off()
    places = ((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
              (0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom"))
    for text, (x, y, ha, va) in zip(letters, places):  # left, right, top, bottom edges
        _letter(ax, text, x, y, ha, va)
    if caption:
        ax.set_title(caption, fontsize=9, color="#333333", pad=3)


def _header_lines(title, warnings, volume_description) -> list:
    lines = [(title, "black", "bold")] if title else []
    lines += [(f"WARNING: {w}", "#b00020", "bold") for w in warnings]
    lines.append((volume_description, "#333333", "normal"))
    lines.append((f"Coloured outlines: segmentation labels; {CONVENTION}.", "#333333", "normal"))
    return lines


def _describe(scan, centre) -> str:
    codes = "".join(nib.aff2axcodes(scan.affine))
    zooms = np.sqrt(np.sum(np.asarray(scan.affine)[:3, :3] ** 2, axis=0))
    oblique = float(np.degrees(np.max(affines.obliquity(scan.affine))))
    text = (f"{os.path.basename(scan.path or '')} {'x'.join(map(str, scan.data.shape))} voxels of "
            f"{' x '.join(f'{z:.3g}' for z in zooms)} mm, voxel order {codes}")
    if oblique > 0.5:
        text += f" (oblique by {oblique:.1f} deg: shown on its own grid, nearest orientation)"
    return text + f"; slices through voxel ({', '.join(map(str, centre))})"


def _layout(figure_size_px, sizes, pixels_per_mm, header_px, margin, gap):
    """Figure-fraction rectangles of the outline row and of the (smaller) fill row."""
    width_px, height_px = figure_size_px
    row_px = max(h for _, h in sizes) * pixels_per_mm
    rects = {"outline": [], "fill": []}
    x = margin
    for w, h in sizes:
        panel_w, panel_h = w * pixels_per_mm, h * pixels_per_mm
        top = height_px - header_px - (row_px - panel_h) / 2
        rects["outline"].append((x / width_px, (top - panel_h) / height_px,
                                 panel_w / width_px, panel_h / height_px))
        fill_w, fill_h = panel_w * FILL_ROW_SCALE, panel_h * FILL_ROW_SCALE
        fill_top = height_px - header_px - row_px - gap - (row_px * FILL_ROW_SCALE - fill_h) / 2
        rects["fill"].append(((x + (panel_w - fill_w) / 2) / width_px,
                              (fill_top - fill_h) / height_px, fill_w / width_px,
                              fill_h / height_px))
        x += panel_w + gap
    return rects


def save_scan_qc_png(scan: "Volume", segmentation: np.ndarray, path: str, *,
                     colours: dict | None = None, title: str = "",
                     warnings: Sequence[str] = (), brain_mask: np.ndarray = None) -> str:
    """Draw the QC picture of one scan and its segmentation and write it to ``path`` (PNG).

    Args:
        scan: the scan (``data`` [X, Y, Z] on its own grid, ``affine`` voxel -> world RAS mm).
        segmentation: [X, Y, Z] integer label IDs on the same grid (0 = background).
        colours: {label ID: (r, g, b) 0-255}; IDs not in it get ``label_colour(ID)``.
        title, warnings: printed above the slices (each warning in red on a line of its own).
        brain_mask: [X, Y, Z] bool on the same grid, or None: its outline drawn in
            ``BRAIN_MASK_COLOUR`` (a whole head's extracted brain).
    Returns the path written: axial, coronal and sagittal slices through the centre of the labelled
    region with label outlines, and below them the same slices with filled labels. Written to a
    temporary file in the same folder and renamed, so ``path`` is never half-written.
    Raises ValueError when ``segmentation`` is not on the scan's grid.
    """
    segmentation = np.asarray(segmentation)
    if segmentation.shape != tuple(scan.data.shape):
        raise ValueError(f"{scan.path}: segmentation shape {segmentation.shape} differs from the "
                         f"scan's shape {tuple(scan.data.shape)}")
    scan_ras, zooms, transform = to_ras_grid(scan.data, scan.affine)
    labels_ras, _, _ = to_ras_grid(segmentation, scan.affine)
    centre = slice_centre(scan.data, segmentation)
    low, high = display_range(scan.data)
    views = _views(scan_ras, labels_ras, ras_index(centre, scan.data.shape, transform), zooms)
    lines = _header_lines(title, list(warnings), _describe(scan, centre))
    masks = None
    if brain_mask is not None:
        mask_ras, _, _ = to_ras_grid(np.asarray(brain_mask, np.uint8), scan.affine)
        masks = [view[1] for view in _views(mask_ras, labels_ras, ras_index(
            centre, scan.data.shape, transform), zooms)]
        lines.insert(1, ("Yellow outline: the brain mask extracted from the head.", "#333333",
                         "normal"))
    figure = _figure(views, zooms, lines, low, high, colours, masks)
    return _save_atomically(figure, path)


def _wrapped(lines, width_px) -> list:
    """Header lines broken to the figure's width (at 10 points, about 7.3 pixels a character,
    8.6 in bold)."""
    return [(part, colour, weight) for text, colour, weight in lines
            for part in textwrap.wrap(text, max(30, int(width_px / (8.6 if weight == "bold"
                                                                      else 7.3)))) or [""]]


def _figure(views, zooms, lines, low, high, colours, masks=None) -> Figure:
    sizes, pixels_per_mm = _panel_sizes(views, zooms)
    margin, gap, dpi, line_px = 10, 14, 100, 17
    width_px = sum(w for w, _ in sizes) * pixels_per_mm + 2 * gap + 2 * margin
    lines = _wrapped(lines, width_px - 2 * margin)
    header_px = line_px * len(lines) + 24  # + room for the panel captions
    row_px = max(h for _, h in sizes) * pixels_per_mm
    height_px = header_px + row_px * (1 + FILL_ROW_SCALE) + gap + margin
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="white")
    for number, (text, colour, weight) in enumerate(lines):
        figure.text(margin / width_px, 1 - (6 + line_px * number) / height_px, text, ha="left",
                    va="top", fontsize=10, color=colour, fontweight=weight)
    rects = _layout((width_px, height_px), sizes, pixels_per_mm, header_px, margin, gap)
    for number, (view, outline_rect, fill_rect) in enumerate(zip(views, rects["outline"],
                                                                  rects["fill"])):
        name, grey, labels, aspect, letters = view
        outlined = outline_image(grey, labels, low, high, colours)
        if masks is not None:
            outlined[label_boundaries(masks[number].astype(np.int32))] = BRAIN_MASK_COLOUR
        _draw_panel(figure, outline_rect, outlined, aspect, letters, caption=name)
        _draw_panel(figure, fill_rect, fill_image(grey, labels, low, high, colours), aspect,
                    letters, interpolation="antialiased")
    return figure


def _save_atomically(figure: Figure, path: str) -> str:
    """Write an RGB PNG (matplotlib's would be RGBA: 10% larger for an alpha nobody uses)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    with atomic_path(path) as temporary:
        rgb.save(temporary, format="PNG")
    return path
