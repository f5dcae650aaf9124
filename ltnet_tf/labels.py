"""Names of FreeSurfer ``aseg`` label IDs, and the structures that the LT-Net benchmark reports.

The names are those of FreeSurfer's ``FreeSurferColorLUT.txt`` (ID 0 is called background here), so
a client can match them with FreeSurfer tools. This is the one place for label names: the exported
SavedModel's JSON, evaluation reports and the CLI all read it.
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
    85: "Optic-Chiasm",
    251: "CC_Posterior",
    252: "CC_Mid_Posterior",
    253: "CC_Central",
    254: "CC_Mid_Anterior",
    255: "CC_Anterior",
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
