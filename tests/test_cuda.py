"""CUDA checks (``pytest -m cuda``; skipped with the reason on machines without a GPU).

For every task, one forward + backward of its tiny model under bf16 autocast on the GPU with a finite
loss and finite gradients; the attention implementations (SDPA with each CUDA kernel, flash-attn
when importable, the math path) against a float64 reference; the GPU input pipeline against the CPU
one; torch.compile (inductor / Triton) against eager; a one-process NCCL group through
``crossmae.utils.init_distributed`` (the function every Slurm task calls), with a DDP step over it.
Run by benchmarks/gpu_check.sh; tolerances are those of bf16 (8-bit mantissa).
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from crossmae.utils import REPO_ROOT, load_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = torch.device("cuda")


def _finite_grads(model: torch.nn.Module) -> int:
    n = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            n += 1
    assert n > 0
    return n


def _bf16():
    return torch.autocast("cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("name,gamma", [("mae_vit_tiny_patch16", 0.75), ("crossmae_vit_tiny_patch16", 0.25)])
def test_pretraining_bf16_forward_backward(name, gamma):
    from crossmae.models import create_model
    torch.manual_seed(0)
    model = create_model(name, img_size=64).to(DEV).train()
    x = torch.randn(4, 3, 64, 64, device=DEV)
    with _bf16():
        loss, pred, mask = model(x, 0.75, gamma)
    assert pred.dtype == torch.bfloat16          # the matmuls really ran in bf16
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    _finite_grads(model)


def test_vitdet_bf16_forward_backward():
    from benchmarks.coco_speed import synthetic_batch
    from transfer.vitdet.model import build_model
    cfg = load_config("smoke", None, REPO_ROOT / "configs" / "coco")
    torch.manual_seed(0)
    model = build_model(cfg.model.to_dict()).to(DEV).train()
    images, targets = synthetic_batch(2, cfg.model.img_size, num_instances=3)
    images = [i.to(DEV) for i in images]
    targets = [{k: v.to(DEV) for k, v in t.items()} for t in targets]
    with _bf16():
        losses = model(images, targets)
    assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_mask"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    _finite_grads(model)


def test_upernet_bf16_forward_backward():
    from transfer.ade20k import PRESET_DIR, build_model
    cfg = load_config("smoke", None, PRESET_DIR)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV).train()
    c = tuple(cfg.data.crop_size)
    x = torch.randn(2, 3, *c, device=DEV)
    y = torch.randint(0, cfg.model.num_classes, (2, *c), device=DEV)
    y[:, :8] = 255
    with _bf16():
        loss = model(x, y)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    _finite_grads(model)


def test_classification_bf16_forward_backward(tiny_mae_official):
    from transfer.classification.finetune import build_finetune_model
    cfg = load_config("smoke", ["input_size=64"], REPO_ROOT / "configs" / "finetune")
    torch.manual_seed(0)
    model, _ = build_finetune_model(str(tiny_mae_official), cfg, num_classes=5)
    model.to(DEV).train()
    x, y = torch.randn(4, 3, 64, 64, device=DEV), torch.randint(0, 5, (4,), device=DEV)
    with _bf16():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    assert logits.shape == (4, 5) and torch.isfinite(loss)
    loss.backward()
    _finite_grads(model)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", [(2, 12, 197, 64), (4, 8, 49, 64), (2, 16, 1024, 80)])
def test_attention_backends_agree_in_bf16(shape):
    """sdpa (each CUDA kernel that accepts the shape), flash-attn (when importable) and math agree
    with a float64 reference to bf16 accuracy (relative error below 1e-2; bf16 rounding gives ~3e-3)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from crossmae.attention import attention, flash_available
    b, h, n, d = shape
    g = torch.Generator(device=DEV).manual_seed(sum(shape))
    q, k, v = (torch.randn(b, h, n, d, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(3))
    kq = k[:, :, : n // 2 + 1]                     # cross-attention: fewer keys than queries
    vq = v[:, :, : n // 2 + 1]
    for kk, vv in ((k, v), (kq, vq)):
        ref = torch.softmax(q.double() @ kk.double().transpose(-2, -1) / d ** 0.5, -1) @ vv.double()
        outs = {"sdpa": attention(q, kk, vv, "sdpa"), "math": attention(q, kk, vv, "math")}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    outs[f"sdpa-{backend.name.lower()}"] = attention(q, kk, vv, "sdpa")
            except RuntimeError:
                pass                                   # kernel not available for this shape / build
        if flash_available():
            outs["flash"] = attention(q, kk, vv, "flash")
        assert "sdpa-flash_attention" in outs or d > 64
        for name, out in outs.items():
            assert out.shape == q.shape and out.dtype == torch.bfloat16, name
            assert torch.isfinite(out).all(), name
            assert _rel_err(out, ref) < 1e-2, (name, _rel_err(out, ref))


def test_gpu_pipeline_decodes_like_the_cpu_path(data_root):
    """decode_jpeg on the GPU (nvjpeg) against libjpeg-turbo on the CPU: JPEG decoders may differ in
    IDCT and chroma upsampling, so within a few levels (bound set loosely for the first run: the
    measured values are printed); the augmented batch then matches the CPU path's within that plus
    the resize tolerance."""
    from crossmae.data import EncodedPretrainFolder, GPUBatchAugment, build_pretrain_dataset, load_rgb
    folder = data_root / "imagenet" / "train"
    enc = EncodedPretrainFolder(folder, 64, subset=32)
    cpu = build_pretrain_dataset(folder, 64, subset=32)
    aug = GPUBatchAugment(DEV, 64)
    torch.manual_seed(3)
    items = [enc[i] for i in range(len(enc))]
    decoded = aug.decode([s for s, _ in items])
    mean_diffs = []
    for (s, _), img in zip(items, decoded):
        ref = torch.from_numpy(np.asarray(load_rgb(s["path"])).copy()).permute(2, 0, 1)
        assert img.device.type == "cuda" and img.shape == ref.shape and img.dtype == torch.uint8
        mean_diffs.append((img.cpu().int() - ref.int()).abs().float().mean().item())
    print(f"nvjpeg vs libjpeg-turbo: mean |diff| per image max {max(mean_diffs):.3f}, "
          f"average {sum(mean_diffs) / len(mean_diffs):.3f} levels")
    assert max(mean_diffs) < 4.0, mean_diffs     # a channel swap or a wrong crop is tens of levels off
    x, labels = aug(enc.collate_fn(items))
    torch.manual_seed(3)
    ref = torch.stack([cpu[i][0] for i in range(len(cpu))])
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    d = ((x.cpu() - ref) * std).abs()
    assert x.shape == (32, 3, 64, 64) and labels.device.type == "cuda"
    print(f"GPU pipeline vs CPU pipeline (64 px): mean |diff| {d.mean():.3f}, max {d.max():.1f} levels")
    assert d.mean() < 4.0, d.mean()


def test_inductor_compile_matches_eager_on_cuda():
    from crossmae.models import create_model
    from crossmae.utils import maybe_compile
    torch.manual_seed(0)
    eager = create_model("crossmae_vit_tiny_patch16", img_size=64).to(DEV)
    comp = maybe_compile(copy.deepcopy(eager), True)
    x = torch.randn(4, 3, 64, 64, device=DEV)
    noise = torch.rand(4, 16, device=DEV)
    losses = []
    for m in (eager, comp):
        with _bf16():
            loss = m(x, 0.75, 0.25, noise=noise)[0]
        loss.backward()
        losses.append(loss.float().item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        if a.grad is not None:
            assert _rel_err(b.grad, a.grad.double()) < 5e-2, n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_one_process_group_via_init_distributed():
    """The Slurm tasks' path: environment variables (as submitit's TorchDistributedEnvironment.export
    sets them) → crossmae.utils.init_distributed → NCCL; then all_reduce, broadcast and one DDP step.
    Runs in a subprocess so the process group does not outlive the test."""
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from crossmae.utils import init_distributed
        rank, world, local = init_distributed(force=True)
        assert (rank, world, local) == (0, 1, 0) and dist.is_initialized()
        assert dist.get_backend() == "nccl", dist.get_backend()
        t = torch.arange(4, device="cuda", dtype=torch.float32)
        dist.all_reduce(t)
        dist.broadcast(t, 0)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        m = torch.nn.Linear(8, 2).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(m, device_ids=[0])
        ddp(torch.randn(3, 8, device="cuda")).sum().backward()
        assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
        dist.barrier()
        dist.destroy_process_group()
        print("NCCL_OK", torch.cuda.nccl.version())
    """)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "NCCL_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
