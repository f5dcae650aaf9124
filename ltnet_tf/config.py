"""Every hyperparameter of a run, in one dataclass that is saved as ``config.json`` in the run folder.

The command-line flags of ``train.py`` are generated from these fields (``ltnet_tf.commands.cli``), so a
default lives here and nowhere else. A loss weight of 0 switches its term off; when every term that
needs a network is off, that network is not built (see ``LTNetConfig.uses_*``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from ltnet_tf.files import atomic_write


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class LTNetConfig:
    # --- grid (filled in from the atlas when training starts) ---
    atlas_shape: Optional[list] = _help("Full-resolution atlas grid (D, H, W); set from the atlas.",
                                        default=None)
    label_ids: Optional[list] = _help("Atlas label IDs, background first; set from the atlas labels.",
                                      default=None)
    downsample: int = _help("Working-resolution factor: the networks run on the grid shrunk by this "
                            "integer factor; predictions are put back on the full grid.", default=1)

    # --- networks ---
    enc_features: list = _help("U-Net encoder features (VoxelMorph default).",
                               default_factory=lambda: [16, 32, 32, 32])
    dec_features: list = _help("U-Net decoder features (VoxelMorph default).",
                               default_factory=lambda: [32, 32, 32, 32, 32, 16, 16])
    int_steps: int = _help("Scaling-and-squaring steps; 0 predicts the displacement directly (as in "
                           "the paper), >0 makes it diffeomorphic.", default=0)
    disc_features: list = _help("Discriminator features per stride-2 3D conv.",
                                default_factory=lambda: [16, 32, 64])

    # --- losses (weight 0 switches a term off) ---
    # Cycle weights: every cycle term's gradient on G_F points against L_sim's (cosine -0.6 to
    # -0.8 on real brains, while G_B lags G_F); at weight 1 they cancel most of it and G_F stays
    # near the identity. At 0.1 / 0.1 / 0.01 they are a regulariser (bench/results/accuracy.md).
    ncc_window: int = _help("Local NCC window n (n x n x n voxels).", default=9)
    weight_sim: float = _help("L_sim: 1 - local NCC between scan and warped atlas.", default=1.0)
    weight_smooth: float = _help("L_smooth: first-order smoothness of the forward displacement.",
                                 default=1.0)
    weight_adv: float = _help("Adversarial term for G_F (0 = no GAN, no discriminator).", default=0.05)
    weight_cyc_img: float = _help("Image cycle: L1 between atlas x and x warped forward then "
                                  "backward (x∘Δp_F∘Δp_B); trains G_F and G_B.",
                                  default=0.1)
    weight_cyc_label: float = _help("Label cycle: soft Dice loss of atlas labels warped forward+back.",
                                    default=0.1)
    weight_cyc_flow: float = _help("Transformation cycle: composed forward/backward displacement ~ 0.",
                                   default=0.01)
    weight_back_sim: float = _help("G_B similarity: 1 - local NCC between atlas and the warped "
                                   "atlas registered back to it (trains G_B only).", default=1.0)
    weight_back_smooth: float = _help("G_B smoothness of the backward displacement (trains G_B "
                                      "only).", default=1.0)
    cycle_warmup_steps: int = _help("The cycle terms (cyc_img, cyc_label, cyc_flow) ramp linearly "
                                    "from 0 to their weight over this many steps, so that they do "
                                    "not hold G_F near the identity before it has learnt to "
                                    "register (0: full weight from the start).", default=300)
    gan_mode: str = _help("Adversarial loss: 'lsgan' (least squares) or 'bce' (non-saturating).",
                          default="lsgan")

    # --- optimisation ---
    g_learning_rate: float = _help("Adam learning rate of the generators.", default=1e-4)
    d_learning_rate: float = _help("Adam learning rate of the discriminator.", default=1e-4)
    batch_size: int = _help("Scans per step (global batch, across replicas).", default=1)
    steps: int = _help("Training steps in total.", default=1500)
    checkpoint_every: int = _help("Save a checkpoint (and validate) every this many steps.",
                                  default=100)
    seed: int = _help("Random seed for weights and data order.", default=0)

    # --- speed ---
    jit_compile: bool = _help("XLA-compile the training step.", default=False)
    mixed_precision: bool = _help("float16 compute on GPU (variables stay float32).", default=False)
    label_chunk: int = _help("Labels warped at once during label transfer (memory vs speed).",
                             default=16)

    # ---------------------------------------------------------------- derived facts
    @property
    def uses_discriminator(self) -> bool:
        return self.weight_adv > 0

    @property
    def uses_backward_generator(self) -> bool:
        return any(w > 0 for w in (self.weight_cyc_img, self.weight_cyc_label, self.weight_cyc_flow,
                                   self.weight_back_sim, self.weight_back_smooth))

    @property
    def grid_multiple(self) -> int:
        """The full grid is padded to a multiple of this so that the U-Net's poolings divide it."""
        return self.downsample * 2 ** len(self.enc_features)

    def padded_shape(self, shape=None) -> tuple:
        shape = shape if shape is not None else self.atlas_shape
        m = self.grid_multiple
        return tuple(int(math.ceil(s / m) * m) for s in shape)

    def working_shape(self, shape=None) -> tuple:
        return tuple(s // self.downsample for s in self.padded_shape(shape))

    # ---------------------------------------------------------------- validation and I/O
    def validate(self) -> "LTNetConfig":
        positive_ints = ("downsample", "batch_size", "steps", "checkpoint_every", "label_chunk",
                         "ncc_window")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.ncc_window % 2 == 0:
            raise ConfigError(f"config field 'ncc_window' must be odd, got {self.ncc_window}")
        if not isinstance(self.cycle_warmup_steps, int) or self.cycle_warmup_steps < 0:
            raise ConfigError(f"config field 'cycle_warmup_steps' must be an integer >= 0, "
                              f"got {self.cycle_warmup_steps!r}")
        if self.int_steps < 0:
            raise ConfigError(f"config field 'int_steps' must be >= 0, got {self.int_steps}")
        for f in dataclasses.fields(self):
            if f.name.startswith("weight_"):
                value = getattr(self, f.name)
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ConfigError(f"config field '{f.name}' must be a finite number >= 0, "
                                      f"got {value!r}")
        for name in ("g_learning_rate", "d_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
                raise ConfigError(f"config field '{name}' must be a finite number > 0, "
                                  f"got {value!r}")
        for name in ("enc_features", "dec_features", "disc_features"):
            if not getattr(self, name):
                raise ConfigError(f"config field '{name}' must list at least one feature count, "
                                  f"got {getattr(self, name)!r}")
        if self.gan_mode not in ("lsgan", "bce"):
            raise ConfigError(f"config field 'gan_mode' must be 'lsgan' or 'bce', got {self.gan_mode!r}")
        if len(self.dec_features) < len(self.enc_features):
            raise ConfigError("config field 'dec_features' needs at least as many entries as "
                              "'enc_features'")
        if self.atlas_shape is not None and len(self.atlas_shape) != 3:
            raise ConfigError(f"config field 'atlas_shape' must have 3 entries, got {self.atlas_shape}")
        return self

    def replace(self, **changes) -> "LTNetConfig":
        """A validated copy; configs are never mutated in place."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LTNetConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**values).validate()

    def save(self, path: str) -> None:
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "LTNetConfig":
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        try:
            return cls.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# What ``train.py --resume`` may change in a run; every other field (architecture, grid, which loss
# terms exist, data order) is fixed once the run has a checkpoint.
RESUME_CHANGEABLE = ("steps", "g_learning_rate", "d_learning_rate", "label_chunk", "jit_compile")

def resume_config(saved: LTNetConfig, asked: LTNetConfig, given, saved_path: str) -> tuple:
    """The configuration a resumed run continues with: the run's ``saved`` one, with the fields
    the user asked to change (``given``: names of explicitly set fields; ``asked``: their values)
    applied where ``RESUME_CHANGEABLE`` allows. -> (config, {field: (old, new)} changed).

    Raises ConfigError naming ``saved_path`` when any other field would change (architecture,
    grid, loss terms, data order): those start a new run, they are never silently dropped.
    """
    changes, refused = {}, []
    for name in sorted(given):
        old, new = getattr(saved, name), getattr(asked, name)
        if new == old:
            continue
        if name in RESUME_CHANGEABLE:
            changes[name] = (old, new)
        else:
            refused.append(f"{name} {old} -> {new}")
    if refused:
        raise ConfigError(f"{saved_path}: --resume cannot change {'; '.join(refused)} (only "
                          f"{', '.join(RESUME_CHANGEABLE)} can change in a run); start a new "
                          f"--model_dir with --config {saved_path} instead")
    return saved.replace(**{name: new for name, (_, new) in changes.items()}), changes


# The ablation of the paper: each is a set of weights over the same code.
PRESETS = {
    "voxelmorph": dict(weight_adv=0.0, weight_cyc_img=0.0, weight_cyc_label=0.0, weight_cyc_flow=0.0,
                       weight_back_sim=0.0, weight_back_smooth=0.0),
    "voxelmorph_gan": dict(weight_cyc_img=0.0, weight_cyc_label=0.0, weight_cyc_flow=0.0,
                           weight_back_sim=0.0, weight_back_smooth=0.0),
    "voxelmorph_cycle": dict(weight_adv=0.0),
    "ltnet": dict(),
}


# Compute budgets: where a run can afford what. 'paper' is LT-Net as published (full resolution, a
# GPU). 'cpu' trains in well under an hour on 2 CPU cores, at quarter resolution: with predict.py's
# refinement it passes ANTs SyN, but refinement from the identity (no network) gets within 0.004
# Dice of it. 'cpu_half' is the same U-Net at half resolution (~3x the step time): G_F's
# displacement is then finer than refinement's coarse stage, and the network alone beats
# refinement from the identity by 0.03-0.04 Dice at equal seconds per scan, where time is short
# (bench/results/accuracy.md; README).
PROFILES = {
    "paper": dict(),
    "cpu": dict(downsample=4, enc_features=[16, 32, 32], dec_features=[32, 32, 32, 16, 16],
                g_learning_rate=1e-3, cycle_warmup_steps=100, steps=1500, checkpoint_every=100),
    "cpu_half": dict(downsample=2, enc_features=[16, 32, 32], dec_features=[32, 32, 32, 16, 16],
                     g_learning_rate=1e-3, cycle_warmup_steps=100, steps=1500,
                     checkpoint_every=100),
}


def preset(name: str, **changes) -> LTNetConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LTNetConfig().replace(**PRESETS[name], **changes)


@dataclass(frozen=True)
class RefinementSettings:
    """Test-time refinement (``ltnet_tf.registration.refinement``): Adam on one scan's displacement, on G_F's
    training objective, coarse to fine. The one place for its defaults: the refinement itself, the
    export's ``segment_refined`` metadata, ``predict.py``'s flags and the benchmarks read them.

    Defaults measured on real brains (bench/results/refinement.md): ``coarse_steps`` on a grid
    ``coarse_factor`` times coarser than the atlas (None: the network's working grid, but no finer
    than the quarter grid), then ``steps`` at ``factor`` (2: half resolution); a learning rate of
    0.2 voxels of the grid per step at most; smoothness weight 4 (at the training weight, 1, a displacement free at every voxel
    folded 1.5-2% of the brain for no better Dice).
    """
    steps: int = 10
    coarse_steps: int = 25
    factor: int = 2
    coarse_factor: Optional[int] = None
    learning_rate: float = 0.2
    weight_smooth: float = 4.0
    jit_compile: bool = True
    # 'ncc': 1 - local NCC (LT-Net's objective); 'ngf': 1 - normalised gradient fields, for scans
    # of another contrast than the atlas's (``refinement.FixedScanNGF``).
    similarity: str = "ncc"

    def __post_init__(self):
        if self.similarity not in ("ncc", "ngf"):
            raise ConfigError(f"refinement 'similarity' must be ncc or ngf, got "
                              f"{self.similarity!r}")
        for name in ("steps", "coarse_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"refinement '{name}' must be an integer >= 0, got {value!r}")
        for name in ("factor", "coarse_factor"):
            value = getattr(self, name)
            if value is None and name == "coarse_factor":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"refinement '{name}' must be a positive integer, got {value!r}")
        for name in ("learning_rate", "weight_smooth"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"refinement '{name}' must be a finite number >= 0, "
                                  f"got {value!r}")

    def replace(self, **changes) -> "RefinementSettings":
        """A copy with the given fields changed; None values keep the current ones."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- the segmenter
@dataclass
class SegmenterConfig:
    """Every setting of a segmentation network trained from the label transfer
    (``ltnet_tf.segmentation``), saved as ``RUN/segmenter/config.json``. The grid fields are set
    from the atlas when training starts; ``SEGMENTER_PROFILES`` hold the compute budgets."""
    atlas_shape: Optional[list] = None      # full atlas grid (D, H, W)
    crop_start: Optional[list] = None       # the brain box on the atlas grid: first voxel
    crop_shape: Optional[list] = None       # and size (a multiple of downsample * 2**levels)
    label_ids: Optional[list] = None        # output channels: label IDs, background first
    downsample: int = 2                     # the network runs on the box shrunk by this factor
    features: list = field(default_factory=lambda: [16, 32, 48, 64])  # per U-Net level
    crop_margin: int = 6                    # voxels kept around the atlas's brain
    patch: int = 64                         # training patches: this many working voxels a side
    learning_rate: float = 1e-3
    steps: int = 4000
    max_minutes: float = 55.0               # training stops at this wall time (or at ``steps``)
    synth_fraction: float = 0.5             # share of synthesised examples (rest: pseudo-labels)
    deform_voxels: float = 2.0              # std of random smooth displacements (working voxels)
    deform_grid: int = 5                    # control points per axis of those displacements
    bias_strength: float = 0.3              # std of the log bias field
    gamma_std: float = 0.25                 # std of log gamma
    noise_std: float = 0.03                 # max std of Gaussian noise (normalised intensities)
    blur_probability: float = 0.25          # chance of a resolution change (pool x2, back up)
    dice_weight: float = 1.0                # loss = dice_weight * (1 - soft Dice) + cross-entropy
    seed: int = 0
    teacher_atlases: int = 1                # atlases whose (fused) labels made the pseudo-labels
    teacher_fusion: Optional[str] = None

    @property
    def levels(self) -> int:
        return len(self.features) - 1

    @property
    def grid_multiple(self) -> int:
        return int(self.downsample) * 2 ** self.levels

    @property
    def working_shape(self) -> tuple:
        return tuple(int(s) // int(self.downsample) for s in self.crop_shape)

    def validate(self) -> "SegmenterConfig":
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ConfigError(f"segmenter 'downsample' must be an integer >= 1, got "
                              f"{self.downsample!r}")
        if not self.features or any(int(f) < 1 for f in self.features):
            raise ConfigError(f"segmenter 'features' must be positive integers, got "
                              f"{self.features!r}")
        for name in ("learning_rate", "max_minutes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"segmenter '{name}' must be a finite number > 0, got {value!r}")
        if not 0.0 <= float(self.synth_fraction) <= 1.0:
            raise ConfigError(f"segmenter 'synth_fraction' must be in [0, 1], got "
                              f"{self.synth_fraction!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"segmenter 'steps' must be an integer >= 1, got {self.steps!r}")
        return self

    def replace(self, **changes) -> "SegmenterConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown segmenter setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SegmenterConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown segmenter setting(s): {', '.join(sorted(unknown))}")
        return cls(**values).validate()


# 'cpu': half resolution on the brain box, a slim U-Net, under an hour on 2 CPU cores; 'gpu': the
# paper's setting (DataAug's U-Net at full resolution, many more steps).
SEGMENTER_PROFILES = {
    "cpu": dict(downsample=2, features=[8, 16, 32, 64], steps=4000, max_minutes=55.0),
    "gpu": dict(downsample=1, features=[32, 64, 128, 256, 256], steps=40000, max_minutes=24 * 60.0,
                learning_rate=2e-4),
}
