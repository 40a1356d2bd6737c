"""MKD benchmark suite: a shared training core for knowledge-distillation benchmarks.

Public entry points: ``mkd.config.load_config``, ``mkd.train.train``, ``python -m mkd.train``.
"""
__version__ = "0.1.0"
