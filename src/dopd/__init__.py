"""dopd: Dual On-policy Distillation (arXiv 2606.30626) and the on-policy distillation methods it is compared with."""

__version__ = "0.1.0"
