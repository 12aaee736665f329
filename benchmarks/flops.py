"""FLOP counts of the MAE / CrossMAE pretraining models: :func:`crossmae.flops.count_flops`.

The counter lives in :mod:`crossmae.flops` so that the pretraining engine can record the FLOPs of
each snapshot (``crossmae.compute``) without importing ``benchmarks`` (dependencies flow
crossmae ← transfer ← benchmarks ← slurm); this module re-exports it for the benchmarks.
"""
from crossmae.flops import count_flops

__all__ = ["count_flops"]
