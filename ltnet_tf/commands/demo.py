"""The built-in demo: synthesise an atlas and scans; segment held-out scans without training, then
train LT-Net on CPU and segment them with it; print the Dice of each against the Dice of no
registration (the atlas labels as they are).

    ltnet-demo            # or python -m ltnet_tf.commands.demo; 2-7 minutes on a 2-core CPU
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import sys
import time

from absl import flags

from ltnet_tf.commands import cli, runner, synthetic
from ltnet_tf.config import ConfigError
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.prediction import cohort

DEMO_SETTINGS = dict(downsample=2, steps=400, checkpoint_every=100, g_learning_rate=1e-3,
                     d_learning_rate=1e-4, enc_features="16,16,16", dec_features="16,16,16,16,16")


def _flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", "demo_run", "Folder for the synthetic data, model and outputs.",
                        flag_values=fv)
    flags.DEFINE_integer("steps", DEMO_SETTINGS["steps"], "Training steps.", flag_values=fv)
    flags.DEFINE_enum("preset", "ltnet", list(cli.PRESETS), "Ablation preset.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and of training.", flag_values=fv)
    return fv


def _no_registration_dice(dataset, test_labels) -> float:
    atlas_labels = data.load_label_map(dataset["atlas_labels"])
    label_ids = sorted(int(i) for i in set(atlas_labels.data.ravel().tolist()))
    before = []
    for path in test_labels:
        scores = evaluation.dice_per_label(atlas_labels.data, data.load_label_map(path).data,
                                           label_ids)
        before.append(evaluation.mean_dice(scores, list(scores)))
    return sum(before) / len(before)


def _train(dataset, train_scans, model_dir, steps, preset, seed) -> None:
    # The cycle terms ramp in over the first third of the run (see LTNetConfig.cycle_warmup_steps).
    settings = {**DEMO_SETTINGS, "steps": steps, "seed": seed,
                "cycle_warmup_steps": max(1, steps // 3)}
    argv = ["train", "--atlas", dataset["atlas"], "--atlas_labels", dataset["atlas_labels"],
            "--unlabeled", ",".join(train_scans), "--model_dir", model_dir, "--preset", preset,
            *[f"--{k}={v}" for k, v in settings.items()]]
    if os.path.exists(os.path.join(model_dir, "config.json")):
        argv.append("--resume")
    if cli.train_main(argv) != 0:
        raise SystemExit(1)


def run_demo(workdir: str, steps: int, preset: str = "ltnet", seed: int = 0) -> dict:
    """Segment held-out synthetic scans without training (the atlas registered to each by
    predict.py's refinement), then train LT-Net and segment them with the network alone and with
    the network and refinement; print the mean Dice of each against no registration."""
    started = time.time()
    dataset = synthetic.make_demo_dataset(os.path.join(workdir, "data"), n_scans=8, seed=seed)
    train_scans, test_scans = dataset["images"][:6], dataset["images"][6:]
    tests, references = ",".join(test_scans), ",".join(dataset["labels"][6:])
    print(f"synthetic data in {os.path.join(workdir, 'data')}: atlas + {len(train_scans)} "
          f"unlabelled training scans + {len(test_scans)} labelled test scans")
    outputs = {name: os.path.join(workdir, "segmentations", name)
               for name in ("no_training", "network", "network_refined")}
    no_training = cohort.predict_files(tests, outputs["no_training"], references,
                                       atlas=dataset["atlas"], atlas_labels=dataset["atlas_labels"])
    model_dir = os.path.join(workdir, "model")
    _train(dataset, train_scans, model_dir, steps, preset, seed)
    network = cohort.predict_files(tests, outputs["network"], references, model_dir=model_dir,
                                   options=cohort.PredictOptions(refine=False))
    refined = cohort.predict_files(tests, outputs["network_refined"], references,
                                   model_dir=model_dir)
    summary = {"dice_no_registration": _no_registration_dice(dataset, dataset["labels"][6:]),
               "dice_no_training": no_training["dice"]["mean_dice"],
               "dice_ltnet": network["dice"]["mean_dice"],
               "dice_ltnet_refined": refined["dice"]["mean_dice"],
               "model_dir": model_dir, "segmentations": outputs,
               "minutes": (time.time() - started) / 60}
    print()
    print(f"mean Dice on {len(test_scans)} held-out scans:")
    print(f"  no registration (atlas labels as they are):   {summary['dice_no_registration']:.3f}")
    print(f"  no training (predict.py --atlas: refinement): {summary['dice_no_training']:.3f}")
    print(f"  {f'LT-Net ({steps} steps), network alone:':46s}{summary['dice_ltnet']:.3f}")
    print(f"  LT-Net + refinement (predict.py's default):   {summary['dice_ltnet_refined']:.3f}")
    print(f"segmentations and report.html: {os.path.join(workdir, 'segmentations')}/*/")
    print(f"model:         {model_dir}  (SavedModel in saved_model/, VoxelMorph G_F in generator.h5)")
    print(f"total time:    {summary['minutes']:.1f} min")
    return summary


def main(argv=None) -> int:
    """The demo; 0 when done, 2 (with the flags' help on stderr) for unknown flags. --help
    prints the flags."""
    fv = _flags()
    try:
        if runner.parse(fv, argv, "usage: ltnet-demo [flags]") is None:  # --help: printed
            return 0
    except ConfigError as e:
        print(f"error: {e}\nusage: ltnet-demo [flags]\n{fv.get_help()}", file=sys.stderr)
        return 2
    run_demo(fv.workdir, fv.steps, fv.preset, fv.seed)
    return 0


def entry():
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    entry()
