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

from seme.api import align, evaluate, merge, validate

__all__ = ["__version__", "align", "evaluate", "merge", "validate"]
