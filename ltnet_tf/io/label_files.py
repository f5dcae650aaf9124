"""Reading a user's label-name file: a FreeSurfer colour table, an ITK-SNAP label description file
or a BIDS ``dseg.tsv``, told apart by content (users name these files freely: ``labels.txt``,
``subfields.lut``, ``atlas.tsv``).

The formats, as their tools write them:

- FreeSurfer ``FreeSurferColorLUT.txt``: ``ID Name R G B A`` separated by spaces or tabs, ``#``
  comments, blank lines between sections; a name has no spaces.
- ITK-SNAP label description file (ITK-SNAP's ``ColorLabelTable::SaveToFile``): a ``#`` header
  block, then ``IDX R G B A VIS MSH "LABEL"`` with alpha in 0-1. ITK-SNAP always writes label 0 as
  its fixed ``"Clear Label"`` and ignores that row when it reads the file; so does this reader, so
  label 0 keeps its usual name (``background``).
- BIDS ``dseg.tsv`` (BIDS derivatives, "Common image-derived labels"): tab-separated with a header
  row; ``index`` and ``name`` required, ``abbreviation``, ``color`` (``#rrggbb``) and ``mapping``
  optional; ``n/a`` marks a missing value. Only ``index``, ``name`` and ``color`` are used.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import List, NamedTuple, Optional, Tuple

from ltnet_tf.errors import DataError

FREESURFER_LUT = "FreeSurfer colour table"
ITKSNAP = "ITK-SNAP label description file"
BIDS_DSEG = "BIDS dseg.tsv"
ACCEPTED_FORMATS = (f"a {FREESURFER_LUT} (ID Name R G B A), an {ITKSNAP} "
                    f'(IDX R G B A VIS MSH "LABEL") or a {BIDS_DSEG} (tab-separated, columns index '
                    "and name)")

_ITKSNAP_ROW = re.compile(r'\s*' + r'(\S+)\s+' * 7 + r'"([^"]*)"\s*')  # 7 fields, "LABEL"
_HEX_COLOUR = re.compile(r"#([0-9a-fA-F]{2})([0-9a-fA-F]{2})([0-9a-fA-F]{2})")
_BIDS_MISSING = "n/a"


class LabelEntry(NamedTuple):
    """One named label as read from a file; ``line`` (1-based) is for error messages."""
    line: int
    label_id: int
    name: str
    colour: Optional[Tuple[int, int, int]]


def name_problem(name) -> Optional[str]:
    """Why ``name`` cannot be a structure name (``None`` if it can).

    Names become CSV column headers and JSON values: the csv module quotes commas and quotes, but a
    line break or tab inside a header breaks line-based readers (``cut``, ``awk``, spreadsheets'
    import), so control characters and Unicode line/paragraph separators are refused.
    """
    if not isinstance(name, str):
        return f"name {name!r} is not text"
    if not name.strip():
        return "empty name"
    if name != name.strip():
        return f"name {name!r} starts or ends with white space"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return f"name {name!r} contains a line break, tab or other control character"
    return None


def read_label_file(path) -> Tuple[str, List[LabelEntry]]:
    """Reads and parses a label-name file, whatever its extension.

    Args:
        path: the file (str or path-like).

    Returns:
        ``(format, entries)``: the format's name (``FREESURFER_LUT``, ``ITKSNAP`` or ``BIDS_DSEG``)
        and the named labels in file order. Names and IDs are not yet checked for duplicates.

    Raises:
        DataError: the file is missing, unreadable, not UTF-8 text, empty, in none of the three
            formats, or a line is malformed (the message names the file and the line).
    """
    lines = _read_lines(path)
    kind = _detect_format(lines, path)
    parse = {FREESURFER_LUT: _parse_freesurfer, ITKSNAP: _parse_itksnap, BIDS_DSEG: _parse_dseg}
    entries = parse[kind](lines, path)
    if not entries:
        raise DataError(f"{path}: {kind} names no labels (label 0 of an ITK-SNAP file is ignored)"
                        if kind == ITKSNAP else f"{path}: {kind} names no labels")
    return kind, entries


# ------------------------------------------------------------------------------------------ reading
def _read_lines(path) -> List[str]:
    path = os.fspath(path)
    try:
        # utf-8-sig drops the byte-order mark that Windows editors put first; newline=None turns
        # CRLF (as in several FreeSurferColorLUT.txt copies) into "\n".
        with open(path, encoding="utf-8-sig", newline=None) as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: label-name file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a label-name file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (not UTF-8); expected {ACCEPTED_FORMATS}") \
            from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the label-name file ({error.strerror})") from None
    if "\0" in text:
        raise DataError(f"{path}: not a text file; expected {ACCEPTED_FORMATS}")
    # Split on "\n" only: str.splitlines would also split on form feeds and Unicode separators,
    # which then could not be reported as what they are.
    return text.split("\n")


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _detect_format(lines: List[str], path) -> str:
    content = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not content:
        raise DataError(f"{path}: the file is empty; expected {ACCEPTED_FORMATS}")
    number, first = content[0]
    header = {field.strip() for field in first.split("\t")}
    if "\t" in first and {"index", "name"} <= header:
        return BIDS_DSEG
    if "\t" in first and header & {"index", "name"}:
        missing = sorted({"index", "name"} - header)[0]
        raise DataError(f"{path}: line {number}: a {BIDS_DSEG} header without the required "
                        f"column {missing!r}")
    if {"index", "name"} <= set(first.split()):
        raise DataError(f"{path}: line {number}: looks like a {BIDS_DSEG} header, but its columns "
                        "are not separated by tabs")
    if any(_is_comment(line) and "label description file" in line.lower() for _, line in content):
        return ITKSNAP
    rows = [(number, line) for number, line in content if not _is_comment(line)]
    if not rows:
        raise DataError(f"{path}: only comments, no labels; expected {ACCEPTED_FORMATS}")
    number, first = rows[0]
    if '"' in first:
        return ITKSNAP
    if re.match(r"\s*\d+\s", first):
        return FREESURFER_LUT
    raise DataError(f"{path}: line {number}: not a label-name file; expected {ACCEPTED_FORMATS}")


# ------------------------------------------------------------------------------------------ fields
def _fail(path, number: int, problem: str, line: str) -> DataError:
    shown = line.strip()
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return DataError(f"{path}: line {number}: {problem} (line: {shown!r})")


def _label_id(text: str, path, number: int, line: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise _fail(path, number, f"label ID {text!r} is not a non-negative integer", line)
    return int(text)


def _channel(text: str, path, number: int, line: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) > 255:
        raise _fail(path, number, f"colour value {text!r} is not an integer in 0-255", line)
    return int(text)


def _checked_name(name: str, path, number: int, line: str) -> str:
    problem = name_problem(name)
    if problem:
        raise _fail(path, number, problem, line)
    return name


# ------------------------------------------------------------------------------------------ formats
def _parse_freesurfer(lines: List[str], path) -> List[LabelEntry]:
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or _is_comment(line):
            continue
        fields = line.split()
        if len(fields) != 6:
            raise _fail(path, number, f"{len(fields)} fields where a {FREESURFER_LUT} has 6, "
                        "'ID Name R G B A' (a name cannot contain spaces)", line)
        label_id = _label_id(fields[0], path, number, line)
        colour = tuple(_channel(field, path, number, line) for field in fields[2:5])
        _channel(fields[5], path, number, line)  # alpha: unused, but a malformed row is refused
        entries.append(LabelEntry(number, label_id, _checked_name(fields[1], path, number, line),
                                  colour))
    return entries


def _parse_itksnap(lines: List[str], path) -> List[LabelEntry]:
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or _is_comment(line):
            continue
        row = _ITKSNAP_ROW.fullmatch(line)
        if row is None:
            raise _fail(path, number, f'not an {ITKSNAP} row, IDX R G B A VIS MSH "LABEL"', line)
        label_id = _label_id(row[1], path, number, line)
        colour = tuple(_channel(row[i], path, number, line) for i in (2, 3, 4))
        try:
            alpha = float(row[5])
        except ValueError:
            alpha = -1.0
        if not 0.0 <= alpha <= 1.0:
            raise _fail(path, number, f"alpha {row[5]!r} is not a number in 0-1", line)
        for flag in (row[6], row[7]):
            if not re.fullmatch(r"\d+", flag):
                raise _fail(path, number, f"visibility flag {flag!r} is not an integer", line)
        if label_id == 0:
            continue  # ITK-SNAP's fixed "Clear Label": ITK-SNAP ignores this row too
        entries.append(LabelEntry(number, label_id, _checked_name(row[8].strip(), path, number,
                                                                  line), colour))
    return entries


def _parse_dseg(lines: List[str], path) -> List[LabelEntry]:
    header_number = next(number for number, line in enumerate(lines, 1) if line.strip())
    header_line = lines[header_number - 1]
    columns = [column.strip() for column in header_line.split("\t")]
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise _fail(path, header_number, f"column {repeated[0]!r} appears twice in the header",
                    header_line)
    index_at, name_at = columns.index("index"), columns.index("name")
    colour_at = columns.index("color") if "color" in columns else None
    entries = []
    for number, line in enumerate(lines[header_number:], header_number + 1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != len(columns):
            raise _fail(path, number, f"{len(fields)} tab-separated fields where the header has "
                        f"{len(columns)}", line)
        label_id = _label_id(fields[index_at], path, number, line)
        name = fields[name_at]
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1].strip()  # early BIDS examples quoted names that have spaces
        if name in ("", _BIDS_MISSING):
            raise _fail(path, number, f"label {label_id} has no name", line)
        colour = None
        if colour_at is not None and fields[colour_at] not in ("", _BIDS_MISSING):
            hex_colour = _HEX_COLOUR.fullmatch(fields[colour_at])
            if hex_colour is None:
                raise _fail(path, number, f"color {fields[colour_at]!r} is not #rrggbb", line)
            colour = tuple(int(part, 16) for part in hex_colour.groups())
        entries.append(LabelEntry(number, label_id, _checked_name(name, path, number, line),
                                  colour))
    return entries
