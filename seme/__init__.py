"""seme: data-free, training-free merging of language models (SeMe and classic methods)."""

__version__ = "0.1.0"
