"""Dispatch of suites to Slurm / local / in-process executors through submitit.

``slurm.submit`` (expand a suite and submit), ``slurm.status`` (task states), ``slurm.cancel``,
``slurm.tasks`` (task specs and the requeue-safe runner), ``slurm.executor`` (executors),
``slurm.selftest`` (a synthetic protocol task), ``slurm.local_cluster`` (a real one-node Slurm for
tests). See ``docs/slurm.md``.
"""
