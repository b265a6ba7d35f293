"""seme: data-free, training-free merging of language models (SeMe and classic methods).

Python API (the CLI is a thin shell over it; ``import seme`` loads no torch)::

    import seme
    result = seme.merge("merge.yaml", "out/")      # or a dict in the same (mergekit) schema
    report = seme.validate("merge.yaml")            # resolve and check everything, merge nothing
    artifact = seme.align("seme.yaml", "artifact/") # SeMe alignment (merge_method: seme)
    metrics = seme.evaluate("out/", "tiny")         # the metrics dict `seme gate` reads

See ``seme.api`` for the parameters.
"""

__version__ = "0.1.0"

from seme.api import align, evaluate, validate

__all__ = ["__version__", "align", "evaluate", "merge", "validate"]


def __getattr__(name: str):
    """``seme.merge`` is the executor module ``seme/merge.py``, itself callable as the API function
    ``seme.merge(config, out_dir, …)`` (``seme.api.merge``); it loads on first use."""
    if name == "merge":
        import importlib

        return importlib.import_module("seme.merge")
    raise AttributeError(f"module 'seme' has no attribute {name!r}")
