"""semalign_ds: cross-scale knowledge transfer (SemAlign) from a large teacher LM into a small student, on DeepSpeed."""

__version__ = "0.1.0"
