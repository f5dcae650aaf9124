"""The user's-input error of the package, in a module of its own so that modules that only read
or write files (label names, reports, the merge of shards) can raise it without TensorFlow."""


class DataError(ValueError):
    """An input file is missing, unreadable or not what the method needs; the message names the file."""
