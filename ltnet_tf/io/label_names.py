"""Structure names and colours for an atlas's label IDs: the user's own, else FreeSurfer's.

An atlas drawn with its own protocol (a lab's hippocampal subfields, a 100-structure atlas) comes
with a label-name file: a FreeSurfer colour table, an ITK-SNAP label description file or a BIDS
``dseg.tsv`` (read by ``label_files``). ``LabelNames`` answers "what is label 1001 called and how is
it drawn"; for IDs the file does not name it falls back to FreeSurfer's aseg names and colours
(``labels.py``), then to ``"label <id>"`` and a generated colour, so an aseg atlas without a file
gets exactly the names it always had.

Names are unique (a duplicate is refused): they are the column headers of ``volumes.csv`` and the
``structure`` column of ``dice.csv``, where two structures under one name could not be told apart
(``csv.DictReader`` keeps only the last of two equal headers, pandas renames one), and BIDS
requires ``dseg.tsv`` names to be unique. Commas and quotes are allowed (the csv module quotes
them); line breaks, tabs and other control characters are refused (``label_files.name_problem``).
"""
from __future__ import annotations

import colorsys
import json
import numbers
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Dict, Iterable, Iterator, Optional, Tuple

from absl import logging

from ltnet_tf.errors import DataError
from ltnet_tf.files import atomic_write
from ltnet_tf.io import label_files
from ltnet_tf.io.labels import FREESURFER_COLOURS, FREESURFER_NAMES

FREESURFER_SOURCE = "FreeSurfer"
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
_LISTED_IDS = 20  # a warning lists at most this many IDs

Colour = Tuple[int, int, int]


def fallback_colour(label_id: int) -> Colour:
    """A colour for an ID that no table colours: hues a golden-ratio step apart, so consecutive IDs
    (the usual numbering of a custom atlas) get clearly different colours; the same on every run."""
    hue = (int(label_id) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.7, 0.95))


def _id_list(ids) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:_LISTED_IDS])
    return shown if len(ids) <= _LISTED_IDS else f"{shown}, ... ({len(ids)} in all)"


class LabelNames(Mapping):
    """An immutable mapping label ID -> structure name, with an optional RGB colour per ID.

    As a ``Mapping`` it holds only the IDs its source names; ``name`` and ``colour`` answer for any
    ID.
    Build one with ``freesurfer()``, ``from_file(path)``, ``from_dict(data)`` or ``load(path)``.
    """

    __slots__ = ("_names", "_colours", "_source")

    def __init__(self, names: Mapping, colours: Optional[Mapping] = None, source: str = ""):
        """Checks and freezes the names.

        Args:
            names: label ID (non-negative int) -> name.
            colours: label ID -> (R, G, B), each 0-255; IDs without one fall back (see ``colour``).
            source: where the names came from (a file path, or ``"FreeSurfer"``), for messages.

        Raises:
            DataError: an ID is not a non-negative integer, a name is empty, repeated or has a line
                break / control character, or a colour is not three integers in 0-255.
        """
        checked_names, checked_colours = _checked(names, colours or {}, source)
        object.__setattr__(self, "_names", MappingProxyType(dict(sorted(checked_names.items()))))
        object.__setattr__(self, "_colours", MappingProxyType(checked_colours))
        object.__setattr__(self, "_source", str(source))

    def __setattr__(self, attribute, value):
        raise AttributeError("LabelNames is immutable")

    __delattr__ = __setattr__

    # ---------------------------------------------------------------------------------- Mapping
    def __getitem__(self, label_id) -> str:
        return self._names[int(label_id)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other) -> bool:
        if not isinstance(other, LabelNames):
            return NotImplemented
        return (dict(self._names) == dict(other._names)
                and dict(self._colours) == dict(other._colours) and self._source == other._source)

    def __hash__(self) -> int:
        return hash((self._source, tuple(self._names.items()),
                     tuple(sorted(self._colours.items()))))

    def __repr__(self) -> str:
        return f"LabelNames({len(self)} names from {self._source!r})"

    # ------------------------------------------------------------------------------------ lookup
    @property
    def source(self) -> str:
        """Where the names came from: the label-name file's path as given, or ``"FreeSurfer"``."""
        return self._source

    def name(self, label_id) -> str:
        """The structure name of a label ID (int or NumPy integer).

        Returns:
            The source's name; else FreeSurfer's aseg name (``labels.FREESURFER_NAMES``); else
            ``"label <id>"``.
        """
        label_id = int(label_id)
        if label_id in self._names:
            return self._names[label_id]
        return FREESURFER_NAMES.get(label_id, f"label {label_id}")

    def colour(self, label_id) -> Colour:
        """The (R, G, B) colour, each 0-255, of a label ID (int or NumPy integer).

        Returns:
            The source's colour; else FreeSurfer's LUT colour for the aseg IDs in
            ``labels.FREESURFER_COLOURS``; else ``fallback_colour(label_id)``.
        """
        label_id = int(label_id)
        if label_id in self._colours:
            return self._colours[label_id]
        return FREESURFER_COLOURS.get(label_id) or fallback_colour(label_id)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def freesurfer(cls) -> "LabelNames":
        """FreeSurfer's aseg names and colours (``labels.py``): the default without a file."""
        return cls(FREESURFER_NAMES, FREESURFER_COLOURS, FREESURFER_SOURCE)

    @classmethod
    def from_file(cls, path) -> "LabelNames":
        """Reads a FreeSurfer colour table, an ITK-SNAP label description file or a BIDS dseg.tsv.

        The format is told by content, not by extension. Label 0 of an ITK-SNAP file (ITK-SNAP's
        fixed "Clear Label") is ignored, as ITK-SNAP itself does.

        Args:
            path: the file (str or path-like); kept as ``source``.

        Returns:
            The names and colours the file gives.

        Raises:
            DataError: one line naming the file (and the line where there is one) if the file is
                missing, unreadable, empty or in none of the three formats, a line is malformed, an
                ID is not a non-negative integer, or an ID or a name appears twice.
        """
        source = os.fspath(path)
        _, entries = label_files.read_label_file(source)
        first_line_of_id: Dict[int, int] = {}
        first_line_of_name: Dict[str, Tuple[int, int]] = {}
        for entry in entries:
            if entry.label_id in first_line_of_id:
                raise DataError(f"{source}: line {entry.line}: label {entry.label_id} is named "
                                f"again (first on line {first_line_of_id[entry.label_id]})")
            if entry.name in first_line_of_name:
                line, label_id = first_line_of_name[entry.name]
                raise DataError(f"{source}: line {entry.line}: name {entry.name!r} of label "
                                f"{entry.label_id} is already label {label_id}'s (line {line}); "
                                "names must be unique, they head the columns of volumes.csv")
            first_line_of_id[entry.label_id] = entry.line
            first_line_of_name[entry.name] = (entry.line, entry.label_id)
        return cls({e.label_id: e.name for e in entries},
                   {e.label_id: e.colour for e in entries if e.colour is not None}, source)

    # -------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """JSON-ready: ``{"source": str, "labels": {"<id>": {"name": str, "colour": [R, G, B]}}}``,
        ``colour`` only for IDs the source colours. For run folders and SavedModel metadata."""
        labels = {}
        for label_id, name in self._names.items():
            labels[str(label_id)] = {"name": name}
            if label_id in self._colours:
                labels[str(label_id)]["colour"] = list(self._colours[label_id])
        return {"source": self._source, "labels": labels}

    @classmethod
    def from_dict(cls, data, origin: str = "label names") -> "LabelNames":
        """The inverse of ``to_dict``.

        Args:
            data: a dict as ``to_dict`` returns it (e.g. parsed from JSON).
            origin: what the dict was read from (a path), named in error messages.

        Raises:
            DataError: ``data`` is not shaped as ``to_dict`` writes it, or its names or colours are
                invalid (as in the constructor).
        """
        if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
            raise DataError(f"{origin}: not saved label names (expected an object with 'labels')")
        names, colours = {}, {}
        for key, entry in data["labels"].items():
            if not isinstance(entry, dict) or "name" not in entry:
                raise DataError(f"{origin}: label {key}: expected an object with a 'name'")
            names[key] = entry["name"]
            if entry.get("colour") is not None:
                colours[key] = entry["colour"]
        _checked(names, colours, origin)  # so that a bad entry is reported against ``origin``
        source = data.get("source")
        return cls(names, colours, source if isinstance(source, str) else origin)

    def save(self, path) -> str:
        """Writes ``to_dict()`` as JSON to ``path`` atomically (a temporary name, then a rename), so a
        reader never sees half a file. Returns the path written."""
        path = os.fspath(path)
        with atomic_write(path, encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path) -> "LabelNames":
        """Reads a file written by ``save``.

        Raises:
            DataError: the file is missing, not JSON, or not saved label names (message names it).
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: saved label names not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"{path}: cannot read saved label names ({message})") from None
        return cls.from_dict(data, origin=path)

    # ---------------------------------------------------------------------------------- coverage
    def check_covers(self, label_ids: Iterable, what: str) -> None:
        """Logs (absl, WARNING) how these names fit an atlas's label IDs.

        One warning names the atlas IDs the source does not name (ID 0 excepted: it is background)
        and what they are called instead; one names the source's IDs that the atlas does not have
        (ignored; not logged for the built-in FreeSurfer table, which names more than an atlas
        has).

        Args:
            label_ids: the atlas's label IDs (ints or NumPy integers).
            what: the atlas, for the messages (e.g. ``"atlas labels atlas_labels.nii.gz"``).

        Raises:
            DataError: two atlas IDs would get the same name (e.g. the file calls 1001
                "Left-Hippocampus" and the atlas also has the unnamed aseg ID 17).
        """
        ids = sorted({int(i) for i in label_ids})
        unnamed = [i for i in ids if i != 0 and i not in self._names]
        if unnamed:
            aseg = [i for i in unnamed if i in FREESURFER_NAMES]
            other = [i for i in unnamed if i not in FREESURFER_NAMES]
            fallbacks = ([f"FreeSurfer's names for {_id_list(aseg)}"] if aseg else []) + (
                [f"'label <id>' for {_id_list(other)}"] if other else [])
            logging.warning("%s does not name %d label(s) of %s, which get %s", self._source,
                            len(unnamed), what, " and ".join(fallbacks))
        atlas_ids = set(ids)
        extra = [i for i in self._names if i not in atlas_ids]
        if extra and self._source != FREESURFER_SOURCE:
            logging.warning("%s names %d label(s) that %s does not have (ignored): %s",
                            self._source, len(extra), what, _id_list(extra))
        owner: Dict[str, int] = {}
        for label_id in ids:
            name = self.name(label_id)
            if name in owner:
                raise DataError(f"{what}: labels {owner[name]} and {label_id} would both be called "
                                f"{name!r} (names from {self._source}); name both in the "
                                "label-name file")
            owner[name] = label_id


def _checked(names: Mapping, colours: Mapping, where: str) -> Tuple[dict, dict]:
    """The names and colours with int IDs, or a DataError naming ``where`` and the bad entry."""
    checked_names: Dict[int, str] = {}
    owner: Dict[str, int] = {}
    for label_id, name in names.items():
        label_id = _checked_id(label_id, where)
        if label_id in checked_names:
            raise DataError(f"{where}: label {label_id} is named twice")
        problem = label_files.name_problem(name)
        if problem:
            raise DataError(f"{where}: label {label_id}: {problem}")
        if name in owner:
            raise DataError(f"{where}: labels {owner[name]} and {label_id} are both called "
                            f"{name!r}; names must be unique")
        checked_names[label_id], owner[name] = name, label_id
    checked_colours: Dict[int, Colour] = {}
    for label_id, colour in colours.items():
        label_id = _checked_id(label_id, where)
        if label_id not in checked_names:
            raise DataError(f"{where}: label {label_id} has a colour but no name")
        checked_colours[label_id] = _checked_colour(colour, label_id, where)
    return checked_names, checked_colours


def _checked_id(label_id, source: str) -> int:
    text = str(label_id)
    if isinstance(label_id, bool) or not text.isascii() or not text.isdigit():
        raise DataError(f"{source}: label ID {label_id!r} is not a non-negative integer")
    return int(text)


def _checked_colour(colour, label_id: int, source: str) -> Colour:
    if (not isinstance(colour, (list, tuple)) or len(colour) != 3
            or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= c <= 255
                       for c in colour)):
        raise DataError(f"{source}: label {label_id}: colour {colour!r} is not three integers in "
                        "0-255")
    return tuple(int(c) for c in colour)
