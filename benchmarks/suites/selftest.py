"""The ``selftest`` suite: a synthetic task following the task protocol, to check a cluster.

``slurm.selftest`` trains a tiny least-squares model for a few steps, checkpoints every step and
resumes bit-exactly, so arrays, requeue after preemption / time-out, failures and cancellation of a
new cluster (or of the local test cluster) can be checked in seconds before spending GPU-hours::

    python -m slurm.submit --suite selftest --backbone any=/dev/null --output-dir /tmp/st
"""
from . import ANY_ARCH, Resources, Suite, TaskDef

CPU = Resources(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, mem_gb=1, timeout_min=30)

SUITE = Suite(
    name="selftest",
    description="synthetic protocol task: arrays, requeue, failure, cancellation",
    tasks=(TaskDef(name="selftest", module="slurm.selftest", protocol="lstsq",
                   configs={ANY_ARCH: "default"}, resources={ANY_ARCH: CPU}),),
    pretrain=TaskDef(name="pretrain", module="slurm.selftest", protocol="pretrain",
                     configs={ANY_ARCH: "default"}, resources={ANY_ARCH: CPU}, needs_backbone=False),
    default_arch="none",
)
