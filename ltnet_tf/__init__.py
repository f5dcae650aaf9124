"""ltnet_tf: one-shot segmentation by learned label transfer (LT-Net, CVPR 2020) on VoxelMorph.

The package's folders are its layers, each importing only from those before it (the order is
written once, in ``LAYERS``; ``tests/test_layers.py`` enforces it):

    compat, config, errors, files   facts every layer shares
    io            reading, writing and describing scans and label maps
    preprocessing brain extraction of whole heads, bias-field correction
    registration  alignment, LT-Net's networks and losses, warping, refinement, label pull, fusion
    labelling     the transferred labels finished by a per-scan intensity model (EM)
    reporting     QC pictures, report.html, the tables
    serving       the run folder, the SavedModel for TF Serving, generator.h5 for VoxelMorph
    training      the LTNet Keras model, its data, callbacks and ``train()``
    segmentation  a segmentation network trained from the label transfer: U-Net, examples, fitting
    prediction    ``Predictor`` (one scan), ``predict_files`` (a cohort), outputs, merge
    commands      train.py / predict.py / export / demo: flags turned into calls

Modules that lived directly under ``ltnet_tf`` before the layers had folders keep working under
their old names (``import ltnet_tf.networks``, ``python -m ltnet_tf.merge``): ``MOVED`` maps each
old name to its module, and the finder below hands out that very module.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from ltnet_tf import compat  # noqa: F401  (must run before TensorFlow is imported)

__version__ = "0.1.0"

LAYERS = ("compat", "errors", "files", "config", "io", "preprocessing", "registration",
          "labelling", "reporting", "serving", "training", "segmentation", "prediction",
          "commands")

MOVED = {
    "data": "io.volumes", "headers": "io.headers", "plausibility": "io.plausibility",
    "intensity": "io.intensity", "labels": "io.labels", "label_names": "io.label_names",
    "label_files": "io.label_files", "evaluation": "io.evaluation",
    "alignment": "registration.alignment", "networks": "registration.networks",
    "losses": "registration.losses", "inference": "registration.transfer",
    "refinement": "registration.refinement", "native": "registration.native",
    "fusion": "registration.fusion", "atlases": "registration.atlases",
    "qc": "reporting.qc", "report": "reporting.report", "reports": "reporting.tables",
    "modeldir": "serving.modeldir", "export": "serving.export", "export_h5": "serving.export_h5",
    "serving_inputs": "serving.serving_inputs",
    "model": "training.model", "dataset": "training.dataset", "callbacks": "training.callbacks",
    "signals": "training.signals", "distribute": "training.distribute",
    "alignment_cache": "training.alignment_cache",
    "cohort": "prediction.cohort", "outputs": "prediction.outputs",
    "run_records": "prediction.run_records", "merge": "prediction.merge",
    "sources": "prediction.sources",
    "cli": "commands.cli", "config_flags": "commands.config_flags", "demo": "commands.demo",
    "synthetic": "commands.synthetic",
}
# ``python -m ltnet_tf.NAME`` runs these (the command, not the library module of the same name).
_RUN_AS = {"export": "commands.export_command"}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``ltnet_tf.<old name>`` is the module now at ``ltnet_tf.<MOVED[old name]>`` (the same object,
    so monkeypatching either name patches both); ``python -m`` runs the new module's code."""

    def find_spec(self, name, path=None, target=None):
        package, _, old = name.rpartition(".")
        if package != __name__ or old not in MOVED:
            return None
        # runpy sets sys.argv[0] from the origin: the file that ``python -m`` runs.
        origin = importlib.util.find_spec(f"{__name__}.{_RUN_AS.get(old, MOVED[old])}").origin
        return importlib.util.spec_from_loader(name, self, origin=origin)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._own_spec = module.__spec__  # the import machinery overwrites it with the alias's
        return module

    def exec_module(self, module):
        """Nothing to run (``create_module`` imported it under its own name); its spec restored."""
        module.__spec__ = self._own_spec

    def get_code(self, fullname):
        old = fullname.rpartition(".")[2]
        new = f"{__name__}.{_RUN_AS.get(old, MOVED[old])}"
        return importlib.util.find_spec(new).loader.get_code(new)


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModule())
