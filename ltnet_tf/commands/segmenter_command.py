"""``train.py --segmenter``: the flags of a segmenter's training and the call they make
(``ltnet_tf.prediction.teacher.train_segmenter``)."""
from __future__ import annotations

from absl import flags

from ltnet_tf.config import SEGMENTER_PROFILES, ConfigError, SegmenterConfig

# train.py's --profile chooses the segmenter's budget too: the CPU profiles train a slim U-Net at
# half resolution, 'paper' the GPU setting.
PROFILE_OF = {"cpu": "cpu", "cpu_half": "cpu", "paper": "gpu"}


def define_segmenter_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("segmenter", False, "Train a segmentation network (3D U-Net) from the label "
                      "transfer instead of G_F: the atlas (or atlases, fused) registered to every "
                      "--unlabeled scan gives pseudo-labels and synthesised examples; saved in "
                      "MODEL_DIR/segmenter/ and used by predict.py --model_dir. No G_F training "
                      "needed (a run folder with a trained G_F lends it to the teacher).",
                      flag_values=fv)
    flags.DEFINE_integer("segmenter_steps", None, "Segmenter: training steps (default: the "
                         "profile's).", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("segmenter_minutes", None, "Segmenter: stop fitting after this many "
                       "minutes (default: the profile's).", lower_bound=0.01, flag_values=fv)
    flags.DEFINE_float("synth_fraction", None, "Segmenter: share of synthesised examples (the "
                       "atlas warped to an unlabelled scan, another scan's appearance); the rest "
                       "are labelled and pseudo-labelled scans (default "
                       f"{SegmenterConfig().synth_fraction}).", lower_bound=0.0, upper_bound=1.0,
                       flag_values=fv)
    flags.DEFINE_float("segmenter_learning_rate", None, "Segmenter: Adam's learning rate.",
                       flag_values=fv)
    flags.DEFINE_enum("teacher_fusion", "jlf", ["majority", "local", "jlf"], "Segmenter with "
                      "several atlases: how their labels are fused into pseudo-labels.",
                      flag_values=fv)


def segmenter_config(fv: flags.FlagValues) -> SegmenterConfig:
    """SegmenterConfig of the profile, then the explicit flags."""
    changes = dict(SEGMENTER_PROFILES[PROFILE_OF.get(fv.profile, "cpu")])
    for flag, name in (("segmenter_steps", "steps"), ("segmenter_minutes", "max_minutes"),
                       ("synth_fraction", "synth_fraction"),
                       ("segmenter_learning_rate", "learning_rate")):
        if fv[flag].value is not None:
            changes[name] = fv[flag].value
    return SegmenterConfig().replace(**changes)


def train_segmenter_command(fv: flags.FlagValues, preparation=None) -> int:
    """``preparation``: a ``ScanPreparation`` for whole heads among the unlabelled scans."""
    from ltnet_tf.prediction.teacher import train_segmenter

    for name in ("unlabeled", "model_dir"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required (see --helpfull)")
    train_segmenter(fv.model_dir, fv.unlabeled, segmenter_config(fv), atlas=fv.atlas,
                    atlas_labels=fv.atlas_labels, fusion=fv.teacher_fusion, export=fv.export,
                    preparation=preparation)
    return 0
