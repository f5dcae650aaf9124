"""What a person reads: QC pictures (``qc``), the static ``report.html`` (``report``), and the
tables ``volumes.csv``, ``dice.csv``/``dice.json`` and ``prediction.json`` (``tables``).

May import: the shared facts and ``ltnet_tf.io`` (no TensorFlow, no registration).
"""
