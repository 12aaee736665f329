"""The ``paper`` suite: the full reference protocols of REFERENCE.md for ViT-B and ViT-L.

Fine-tune and linear probe on ImageNet-1k, iNaturalist 2019 and Places365 (the MAE fine-tune /
linear-probe recipes), ViTDet Mask R-CNN on COCO, UperNet on ADE20K. Config presets are
``configs/<task>/paper_vit_base.py`` / ``paper_vit_large.py`` (``linprobe_paper_vit_*.py`` for the
iNat / Places linear probes). Resources target A100-80GB nodes with 8 GPUs
(one DDP process per GPU, 10 cores and 60 GB per process); the global batch of each recipe is
spread over ``nodes × gpus_per_node`` processes by the task's config. Partition, account, QoS and
``--constraint`` (e.g. ``a100``) are never set here: pass them to ``slurm.submit``. Time limits are
per attempt; a task that hits one is requeued and resumes from its latest checkpoint.
"""
from . import Resources, Suite, TaskDef

B, L = "vit_base_patch16", "vit_large_patch16"


def a100(nodes: int, hours: float) -> Resources:
    """``nodes`` full 8×A100 nodes for ``hours`` per attempt."""
    return Resources(nodes=nodes, gpus_per_node=8, tasks_per_node=8, cpus_per_task=10, mem_gb=480,
                     timeout_min=int(hours * 60), gpu_type="A100-80GB")


def _task(name: str, module: str, protocol: str, res_b: Resources, res_l: Resources, prefix: str = "") -> TaskDef:
    return TaskDef(name=name, module=module, protocol=protocol,
                   configs={B: f"{prefix}paper_vit_base", L: f"{prefix}paper_vit_large"}, resources={B: res_b, L: res_l},
                   args=("--protocol", "linprobe") if prefix == "linprobe_" else ())


SUITE = Suite(
    name="paper",
    description="reference protocols (REFERENCE.md §3-5) for ViT-B and ViT-L on 8xA100 nodes",
    tasks=(
        # ImageNet fine-tune: B 100 ep, batch 1024; L 50 ep.
        _task("finetune", "transfer.finetune", "finetune", a100(2, 24), a100(4, 24)),
        # linear probe: 90 ep, LARS, batch 16384.
        _task("linprobe", "transfer.linprobe", "linprobe", a100(2, 24), a100(2, 24)),
        # iNaturalist 2019 / Places365: the fine-tune recipe, and the linear-probe recipe.
        _task("inat", "transfer.inat", "finetune", a100(2, 24), a100(4, 24)),
        _task("inat_linprobe", "transfer.inat", "linprobe", a100(1, 24), a100(2, 24), prefix="linprobe_"),
        _task("places", "transfer.places", "finetune", a100(2, 24), a100(4, 24)),
        _task("places_linprobe", "transfer.places", "linprobe", a100(1, 24), a100(2, 24), prefix="linprobe_"),
        # ViTDet Mask R-CNN, batch 64, 184,375 iterations, on detectron2's 64 GPUs: the recipe itself
        # (configs/coco/paper_vit_*.py ``resources``) records 8 nodes x 8 GPUs, which slurm.submit requests.
        _task("coco", "transfer.coco", "vitdet", a100(8, 24), a100(8, 24)),
        # UperNet, batch 16, 160k iterations.
        _task("ade20k", "transfer.ade20k", "upernet", a100(1, 24), a100(2, 24)),
    ),
    # 800-epoch pretraining, batch 4096 (ViT-B: 4 nodes; ViT-L: 8 nodes), requeued until done.
    pretrain=TaskDef(name="pretrain", module="crossmae.pretrain", protocol="pretrain",
                     configs={B: "paper_crossmae_vit_base", L: "paper_crossmae_vit_large"},
                     resources={B: a100(4, 24), L: a100(8, 24)}, needs_backbone=False),
    default_arch=B,
)
