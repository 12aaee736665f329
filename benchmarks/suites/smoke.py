"""The ``smoke`` suite: every transfer task with tiny settings that finish on 2 CPU cores.

Each task runs its ``configs/<task>/smoke.py`` preset on the bundled real mini datasets (the data
root is the ``--data-root`` option of ``slurm.submit`` / ``slurm.main_job``). Numbers from it
say that the pipeline works end to end, never how good a backbone is. The pretraining presets used
by the main job are ``configs/pretrain/smoke_mae.py`` and ``smoke_crossmae.py``.
"""
from . import ANY_ARCH, Resources, Suite, TaskDef

#: one CPU core, 4 GB, 20 minutes per attempt: the main job runs two of these at a time on 2 cores.
CPU = Resources(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, mem_gb=4, timeout_min=20,
                gpu_type="cpu")


def _task(name: str, module: str, protocol: str, config: str = "smoke", args: tuple = ()) -> TaskDef:
    return TaskDef(name=name, module=module, protocol=protocol, configs={ANY_ARCH: config},
                   resources={ANY_ARCH: CPU}, args=args)


SUITE = Suite(
    name="smoke",
    description="every task, tiny settings, 2 CPU cores",
    # longest first (coco, ade20k), so two-at-a-time local runs pack well
    tasks=(
        _task("coco", "transfer.coco", "vitdet"),
        _task("ade20k", "transfer.ade20k", "upernet"),
        _task("finetune", "transfer.finetune", "finetune"),
        _task("linprobe", "transfer.linprobe", "linprobe"),
        _task("inat", "transfer.inat", "finetune"),
        _task("inat_linprobe", "transfer.inat", "linprobe", "linprobe_smoke", ("--protocol", "linprobe")),
        _task("places", "transfer.places", "finetune"),
        _task("places_linprobe", "transfer.places", "linprobe", "linprobe_smoke", ("--protocol", "linprobe")),
    ),
    pretrain=TaskDef(name="pretrain", module="crossmae.pretrain", protocol="pretrain",
                     configs={ANY_ARCH: "smoke_crossmae"}, resources={ANY_ARCH: CPU}, needs_backbone=False),
    default_arch="vit_tiny_patch16",
    extra={"pretrain_presets": {"mae": "smoke_mae", "crossmae": "smoke_crossmae"}},
)
