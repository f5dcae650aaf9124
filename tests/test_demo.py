"""The README's first command runs the built-in demo: it must work as a newcomer runs it (here with
2 training steps instead of 400, so that it is quick)."""
import os

from ltnet_tf.commands import demo
import pytest

pytestmark = pytest.mark.slow  # runs the demo end to end (CI runs -m slow too)


def test_demo_segments_without_and_with_training(tmp_path, capsys):
    assert demo.main(["demo", "--workdir", str(tmp_path), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    for line in ("no registration", "no training (predict.py --atlas", "network alone",
                 "LT-Net + refinement", "total time"):
        assert line in printed, printed
    for name in ("no_training", "network", "network_refined"):
        folder = tmp_path / "segmentations" / name
        assert (folder / "dice.json").exists() and (folder / "report.html").exists()
    assert os.path.isdir(tmp_path / "model" / "saved_model")
