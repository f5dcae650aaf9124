"""Scans paired with their label maps by file name: validation sets, references, atlases given as
two folders. A scan and a label map belong together when their ``scan_name`` (the file name
without its extension) is the same; anything unmatched is an error naming the file.
"""
from __future__ import annotations

from ltnet_tf.io.volumes import (DataError, check_same_grid, list_images, load_label_map, load_scan,
                                 scan_name)


def pair_images_and_labels(image_paths, label_paths) -> list:
    """Match scans to label maps by ``scan_name``; [(image_path, label_path)] in scan order."""
    images = list_images(image_paths)
    labels = list_images(label_paths)

    def by_name(paths):
        named = {}
        for path in paths:
            name = scan_name(path)
            if name in named:
                raise DataError(f"{path}: same scan name '{name}' as {named[name]}")
            named[name] = path
        return named

    labels_by_name = by_name(labels)
    images_by_name = by_name(images)
    for name, path in images_by_name.items():
        if name not in labels_by_name:
            raise DataError(f"{path}: no label map named '{name}' among the label maps")
    for name, path in labels_by_name.items():
        if name not in images_by_name:
            raise DataError(f"{path}: no scan named '{name}' among the scans")
    return [(path, labels_by_name[scan_name(path)]) for path in images]


def load_validation_pairs(image_paths, label_paths) -> list:
    """Load the validation set as [(scan Volume, label Volume)], each label map on its scan's grid."""
    pairs = []
    for image_path, label_path in pair_images_and_labels(image_paths, label_paths):
        scan, labels = load_scan(image_path), load_label_map(label_path)
        check_same_grid(scan, labels, strict=False)
        pairs.append((scan, labels))
    return pairs
