"""oftsr: one-step flow super-resolution (OFTSR, arXiv 2412.09465) with a fidelity-realism knob.

The core (this package's top-level modules and :mod:`oftsr.nets`) is plain PyTorch and imports no Ray, MLflow or
S3 code; see :mod:`oftsr.conventions` for the ranges and the time direction.
"""

__version__ = "0.1.0"
