"""Names of FreeSurfer ``aseg`` label IDs, and the structures that the LT-Net benchmark reports.

The names are those of FreeSurfer's ``FreeSurferColorLUT.txt`` (ID 0 is called background here), so
a client can match them with FreeSurfer tools. This is the one place for FreeSurfer's names and
colours: the exported SavedModel's JSON, evaluation reports and the CLI read it, and
``label_names.LabelNames`` falls back to it for aseg IDs that a user's label-name file leaves out.
"""
from __future__ import annotations

FREESURFER_NAMES = {
    0: "background",
    2: "Left-Cerebral-White-Matter",
    3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    14: "3rd-Ventricle",
    15: "4th-Ventricle",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    18: "Left-Amygdala",
    24: "CSF",
    26: "Left-Accumbens-area",
    28: "Left-VentralDC",
    30: "Left-vessel",
    31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent",
    46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus",
    50: "Right-Caudate",
    51: "Right-Putamen",
    52: "Right-Pallidum",
    53: "Right-Hippocampus",
    54: "Right-Amygdala",
    58: "Right-Accumbens-area",
    60: "Right-VentralDC",
    62: "Right-vessel",
    63: "Right-choroid-plexus",
    72: "5th-Ventricle",
    77: "WM-hypointensities",
    80: "non-WM-hypointensities",
    85: "Optic-Chiasm",
    251: "CC_Posterior",
    252: "CC_Mid_Posterior",
    253: "CC_Central",
    254: "CC_Mid_Anterior",
    255: "CC_Anterior",
}

# RGB colours (0-255) of the IDs above, from FreeSurfer 7's ``FreeSurferColorLUT.txt`` (the alpha
# column, always 0 there, is left out); older tables (the 2012 one, for instance) drew ID 41 green.
FREESURFER_COLOURS = {
    0: (0, 0, 0),
    2: (245, 245, 245),
    3: (205, 62, 78),
    4: (120, 18, 134),
    5: (196, 58, 250),
    7: (220, 248, 164),
    8: (230, 148, 34),
    10: (0, 118, 14),
    11: (122, 186, 220),
    12: (236, 13, 176),
    13: (12, 48, 255),
    14: (204, 182, 142),
    15: (42, 204, 164),
    16: (119, 159, 176),
    17: (220, 216, 20),
    18: (103, 255, 255),
    24: (60, 60, 60),
    26: (255, 165, 0),
    28: (165, 42, 42),
    30: (160, 32, 240),
    31: (0, 200, 200),
    41: (245, 245, 245),
    42: (205, 62, 78),
    43: (120, 18, 134),
    44: (196, 58, 250),
    46: (220, 248, 164),
    47: (230, 148, 34),
    49: (0, 118, 14),
    50: (122, 186, 220),
    51: (236, 13, 176),
    52: (13, 48, 255),
    53: (220, 216, 20),
    54: (103, 255, 255),
    58: (255, 165, 0),
    60: (165, 42, 42),
    62: (160, 32, 240),
    63: (0, 200, 221),
    72: (120, 190, 150),
    77: (200, 70, 255),
    80: (164, 108, 226),
    85: (234, 169, 30),
    251: (0, 0, 64),
    252: (0, 0, 112),
    253: (0, 0, 160),
    254: (0, 0, 208),
    255: (0, 0, 255),
}

# The 28 structures over which brain-MRI label-transfer papers (LT-Net among them) average Dice.
BENCHMARK_LABELS = (
    2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28,
    41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60,
)


def structure_name(label_id) -> str:
    """FreeSurfer name of a label ID; ``"label <id>"`` for IDs without one."""
    label_id = int(label_id)
    return FREESURFER_NAMES.get(label_id, f"label {label_id}")
