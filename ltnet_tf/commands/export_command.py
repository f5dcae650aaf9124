"""``ltnet-export --model_dir RUN`` (or ``python -m ltnet_tf.commands.export_command``): re-export
a run's SavedModel and generator.h5.

The command line itself is ``ltnet_tf.commands.cli.export_main``; this module only runs it, so
that the library module ``ltnet_tf.serving.export`` never imports the command layer.
"""
from ltnet_tf.commands.cli import export_entry

if __name__ == "__main__":
    export_entry()
