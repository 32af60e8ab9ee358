"""opdlab: on-policy distillation, and what it does to a model's parameters."""

__version__ = "0.1.0"
