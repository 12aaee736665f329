"""Parity of the classification protocols with the official MAE code (the oracle), when a
facebookresearch/mae checkout is available.

``MAE_OFFICIAL_SRC=<facebookresearch/mae checkout>`` (nothing is installed; the checkout's folder is
put on ``sys.path`` while its modules are imported). The blocks of the official ``main_finetune.py``
/ ``main_linprobe.py`` ``main()`` are found with ``ast`` and run as written (argument parsers,
checkpoint loading, the probe's BN head hack and freezing, LARS, Mixup and criterion, the probe's
transforms); the recipe values come from the commands in the checkout's ``FINETUNE.md``. On the
bundled real ImageNet images (``$CROSSMAE_DATA_ROOT/imagenet``, fp32, CPU) we assert:

* the presets ``configs/finetune/paper_vit_{base,large,huge}`` and ``configs/linprobe/paper_vit_{base,
  large}`` equal the FINETUNE.md commands (effective batch, epochs, blr, layer decay, weight decay,
  drop path, augmentation, Mixup, smoothing, warmup, min lr, pooling — defaults from the official parsers);
* the layer-decay parameter groups (lr scale and weight decay of every parameter, AdamW settings) of
  ViT-B and ViT-L;
* the per-iteration learning rate of every group and the weights after training, accumulation 1 and 4
  (official ``engine_finetune.train_one_epoch`` vs ``transfer.classification.common.train_one_epoch``);
* the fine-tuning train transform (RandAugment, RandomErasing), the eval transforms, and the linear
  probe's train transform (``util/crop.py``) — seeded outputs, every pixel, many draws, images of
  several shapes (4:3, 3:4, square, wide);
* Mixup/CutMix with label smoothing, and the criterion chosen for each setting;
* the fine-tuning model (checkpoint load, pos-embed interpolation, head init, drop-path rates,
  forward in eval and train mode with drop path) and the probe (features, BN head, LARS steps).

Shims the official code needs on current torch / torchvision / timm / Pillow, all inside this test
process (undone after the module or test): ``torch._six`` (``util/misc.py`` imports ``inf`` from it);
``torchvision.transforms.functional._get_image_size`` (``util/crop.py``; now ``get_image_size``);
timm 0.3.2's ``VisionTransformer.forward`` = ``head(forward_features(x))`` on the official models
(current timm pools again in ``forward_head``); ``torch.cuda.synchronize`` a no-op (called by
``engine_finetune`` on a machine without a GPU); Pillow < 13 ``ImageOps.posterize`` accepting 0 bits
(RandAugment's posterize at high magnitude); ``argparse.Namespace`` allowed by ``torch.load``'s
weights-only unpickler (official checkpoints hold ``args``). ``main_*.py`` are never imported (their
``assert timm.__version__ == "0.3.2"`` is not run); the tiny official ViTs are ``models_vit.VisionTransformer``
with the arguments of ``vit_base_patch16`` and tiny sizes. Without the checkout every test is skipped
with the reason; CI never downloads it. Setup: docs/classification.md, "Parity with the official MAE code".
"""
from __future__ import annotations

import argparse
import ast
import copy
import math
import os
import random
import re
import shlex
import sys
import textwrap
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

MAE = os.environ.get("MAE_OFFICIAL_SRC")
if not MAE or not (Path(MAE) / "main_linprobe.py").is_file() or not (Path(MAE) / "util" / "crop.py").is_file():
    pytest.skip("MAE_OFFICIAL_SRC is not set to a facebookresearch/mae checkout: parity with the official MAE "
                "classification code not checked (setup: docs/classification.md, 'Parity with the official MAE code')",
                allow_module_level=True)

from crossmae.data import load_rgb  # noqa: E402
from crossmae.utils import REPO_ROOT, load_config  # noqa: E402
from transfer.classification import common as C  # noqa: E402
from transfer.classification.data import (eval_transform, finetune_train_transform,  # noqa: E402
                                          linprobe_train_transform)
from transfer.classification.finetune import build_criterion, build_finetune_model, build_mixup, build_optimizer  # noqa: E402
from transfer.classification.lars import LARS  # noqa: E402
from transfer.classification.linprobe import LinearProbe, build_encoder  # noqa: E402

pytestmark = pytest.mark.mae_official
MAE = Path(MAE)
#: Real images of several shapes (W x H): 4:3, 3:4, squares, wide ones.
IMAGES = ["n04443257/n04443257_tobacco_shop.JPEG", "n02965783/n02965783_car_mirror.JPEG",
          "n04254680/n04254680_soccer_ball.JPEG", "n02095889/n02095889_Sealyham_terrier.JPEG",
          "n04590129/n04590129_window_shade.JPEG", "n01882714/n01882714_koala.JPEG",
          "n02692877/n02692877_airship.JPEG", "n04367480/n04367480_swab.JPEG"]


# --------------------------------------------------------------------------------------------------
# the official code, imported with in-process shims
# --------------------------------------------------------------------------------------------------
def _old_posterize(img, bits):
    """Pillow < 13 ``ImageOps.posterize``: keep the ``bits`` high bits (0 bits: a black image)."""
    from PIL import ImageOps
    mask = ~(2 ** (8 - bits) - 1)
    return ImageOps._lut(img, [i & mask for i in range(256)] * len(img.getbands()))


@pytest.fixture(scope="module")
def mae():
    """The official modules (``util.*``, ``models_vit``, ``engine_finetune``), imported from the checkout."""
    import torchvision.transforms.functional as TF
    mp = pytest.MonkeyPatch()
    try:
        import torch._six  # noqa: F401
    except ImportError:
        mp.setitem(sys.modules, "torch._six", types.SimpleNamespace(inf=math.inf))
    if not hasattr(TF, "_get_image_size"):
        mp.setattr(TF, "_get_image_size", TF.get_image_size, raising=False)
    names = ["util", "util.crop", "util.lars", "util.lr_decay", "util.lr_sched", "util.datasets", "util.pos_embed",
             "util.misc", "models_vit", "engine_finetune"]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(MAE))
    try:
        import importlib
        mods = types.SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(n) for n in names[1:]})
    finally:
        sys.path.remove(str(MAE))
    yield mods
    for n in names:
        sys.modules.pop(n, None)
    sys.modules.update(saved)
    mp.undo()


def main_block(script: str, *starts: str) -> str:
    """Source of the top-level statements of ``main()`` in the official ``script`` whose text starts
    with one of ``starts`` (file order). Fails when one of them is not found (the oracle changed)."""
    src = (MAE / script).read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    out, seen = [], set()
    for st in fn.body:
        seg = textwrap.dedent(ast.get_source_segment(src, st, padded=True))
        hit = [s for s in starts if seg.startswith(s)]
        if hit:
            out.append(seg)
            seen.update(hit)
    assert seen == set(starts), f"{script}: main() has no statement starting with {sorted(set(starts) - seen)}"
    return "\n".join(out)


def run_block(script: str, starts: tuple, **ns) -> dict:
    ns.setdefault("torch", torch)
    exec(compile(main_block(script, *starts), f"{MAE / script}:main", "exec"), ns)
    return ns


def official_parser(script: str) -> argparse.ArgumentParser:
    """``get_args_parser()`` of ``main_finetune.py`` / ``main_linprobe.py`` (run from its source)."""
    src = (MAE / script).read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
    ns = {"argparse": argparse}
    exec(compile(ast.get_source_segment(src, fn), str(MAE / script), "exec"), ns)
    return ns["get_args_parser"]()


def submitit_args(script: str, argv: list[str], main_script: str) -> argparse.Namespace:
    """``parse_args()`` of ``submitit_finetune.py`` / ``submitit_linprobe.py`` run on ``argv``."""
    src = (MAE / script).read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "parse_args")
    ns = {"argparse": argparse, "classification": types.SimpleNamespace(get_args_parser=lambda: official_parser(main_script))}
    exec(compile(ast.get_source_segment(src, fn), str(MAE / script), "exec"), ns)
    old = sys.argv
    sys.argv = [script] + argv
    try:
        return ns["parse_args"]()
    finally:
        sys.argv = old


def finetune_md_commands() -> list[dict]:
    """Every training command of the checkout's FINETUNE.md: ``{'section', 'args' (parsed by the
    official parsers), 'gpus', 'effective_batch'}``. The probe's ViT-L command is the ViT-B one with
    the model and epochs of the sentence that follows it."""
    md = (MAE / "FINETUNE.md").read_text()
    out = []
    for m in re.finditer(r"```\n(.*?)```", md, re.S):
        text = m.group(1).replace("\\\n", " ")
        section = "linprobe" if md.rfind("### Linear Probing", 0, m.start()) >= 0 else "finetune"
        argv = shlex.split(text)
        script = next((a for a in argv if a.endswith(".py")), None)
        if script is None or "--eval" in argv:
            continue
        rest = argv[argv.index(script) + 1:]
        main_script = "main_linprobe.py" if section == "linprobe" else "main_finetune.py"
        if script.startswith("submitit_"):
            a = submitit_args(script, rest, main_script)
            gpus = a.nodes * a.ngpus
        else:
            a = official_parser(main_script).parse_args(rest)
            gpus = int(next(x.split("=")[1] for x in argv if x.startswith("--nproc_per_node")))
        out.append({"section": section, "args": a, "gpus": gpus, "effective_batch": a.batch_size * a.accum_iter * gpus})
        if section == "linprobe":
            s = re.search(r"set `--model (vit_large_patch16)`.*?`--epochs (\d+)`", md[m.end():], re.S)
            assert s, "FINETUNE.md: the ViT-L/H probe sentence was not found"
            a2 = submitit_args(script, rest + ["--model", s.group(1), "--epochs", s.group(2)], main_script)
            out.append({"section": section, "args": a2, "gpus": gpus, "effective_batch": a2.batch_size * a2.accum_iter * gpus})
    return out


def official_vit(mae, img_size: int, num_classes: int, global_pool: bool, drop_path: float = 0.0,
                 embed_dim: int = 64, depth: int = 4, heads: int = 4):
    """``models_vit.VisionTransformer`` with ``vit_base_patch16``'s arguments at tiny sizes (our
    ``vit_tiny_patch16``), and timm 0.3.2's ``forward`` (head of ``forward_features``)."""
    m = mae.models_vit.VisionTransformer(
        global_pool=global_pool, img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
        drop_path_rate=drop_path)
    m.forward = types.MethodType(lambda self, x: self.head(self.forward_features(x)), m)
    return m


def load_official_checkpoint(script: str, model, ckpt: Path, mae) -> dict:
    """The ``if args.finetune and not args.eval:`` block of ``script`` run as written."""
    from timm.models.layers import trunc_normal_
    args = argparse.Namespace(finetune=str(ckpt), eval=False, global_pool=getattr(model, "global_pool", False))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return run_block(script, ("if args.finetune and not args.eval:",), model=model, args=args,
                         interpolate_pos_embed=mae.pos_embed.interpolate_pos_embed, trunc_normal_=trunc_normal_)


def preset(family: str, name: str, *opts: str):
    return load_config(name, list(opts), preset_dir=REPO_ROOT / "configs" / family)


@pytest.fixture(scope="module")
def images(data_root):
    return [load_rgb(str(data_root / "imagenet" / "train" / p)) for p in IMAGES]


def _seed(k: int) -> None:
    random.seed(k)
    np.random.seed(k)
    torch.manual_seed(k)


# --------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------
FT_KEYS = {"epochs": "epochs", "blr": "blr", "lr": "lr", "min_lr": "min_lr", "warmup_epochs": "warmup_epochs",
           "weight_decay": "weight_decay", "layer_decay": "layer_decay", "drop_path": "drop_path",
           "clip_grad": "clip_grad", "smoothing": "smoothing", "mixup": "mixup", "cutmix": "cutmix",
           "cutmix_minmax": "cutmix_minmax", "mixup_prob": "mixup_prob", "mixup_switch_prob": "mixup_switch_prob",
           "mixup_mode": "mixup_mode", "input_size": "input_size", "aug.auto_augment": "aa",
           "aug.color_jitter": "color_jitter", "aug.reprob": "reprob", "aug.remode": "remode", "aug.recount": "recount",
           "data.num_classes": "nb_classes", "seed": "seed"}
LP_KEYS = {"epochs": "epochs", "blr": "blr", "lr": "lr", "min_lr": "min_lr", "warmup_epochs": "warmup_epochs",
           "weight_decay": "weight_decay", "data.num_classes": "nb_classes", "seed": "seed"}
PRESETS = {("finetune", "vit_base_patch16"): "paper_vit_base", ("finetune", "vit_large_patch16"): "paper_vit_large",
           ("finetune", "vit_huge_patch14"): "paper_vit_huge", ("linprobe", "vit_base_patch16"): "paper_vit_base",
           ("linprobe", "vit_large_patch16"): "paper_vit_large"}


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


def test_presets_equal_finetune_md_commands():
    cmds = finetune_md_commands()
    assert len(cmds) == 6, [(c["section"], c["args"].model) for c in cmds]  # 4 fine-tuning, 2 probe
    compared, covered = 0, set()
    for c in cmds:
        a, family = c["args"], c["section"]
        name = PRESETS[(family, a.model)]
        cfg = preset(family, name)
        where = f"configs/{family}/{name}.py vs FINETUNE.md {a.model}"
        assert cfg.arch == a.model, where
        assert cfg.total_batch_size == c["effective_batch"], (where, cfg.total_batch_size, c["effective_batch"])
        assert cfg.global_pool == ("avg" if a.global_pool else "token"), where
        for ours, theirs in (FT_KEYS if family == "finetune" else LP_KEYS).items():
            assert _get(cfg, ours) == getattr(a, theirs), (where, ours, _get(cfg, ours), getattr(a, theirs))
            compared += 1
        *_, lr = C.batch_and_lr(cfg, world=1)  # lr depends on the total batch only
        assert lr == a.blr * c["effective_batch"] / 256, where
        compared += 4
        covered.add((family, name))
    assert covered == set((f, n) for (f, _), n in PRESETS.items())
    print(f"recipe values compared: {compared} over {len(cmds)} commands, 0 differ")


# --------------------------------------------------------------------------------------------------
# optimizer groups, per-iteration lr
# --------------------------------------------------------------------------------------------------
def _stub_checkpoint(path: Path, model) -> Path:
    """An MAE-encoder-layout checkpoint with the official model's encoder shapes, every tensor a
    stride-0 view of one number (a ViT-L in a few KB): only names and shapes matter for the groups."""
    sd = {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()
          if not k.startswith(("head.", "fc_norm."))}
    d = model.embed_dim
    sd.update({"norm.weight": torch.ones(()).expand(d), "norm.bias": torch.zeros(()).expand(d)})
    torch.save({"model": sd}, path)
    return path


@pytest.mark.parametrize("arch,name", [("vit_base_patch16", "paper_vit_base"), ("vit_large_patch16", "paper_vit_large")])
def test_layer_decay_groups_equal_official(mae, arch, name, tmp_path):
    cfg = preset("finetune", name)
    with torch.device("meta"):
        off = mae.models_vit.__dict__[arch](num_classes=1000, drop_path_rate=cfg.drop_path, global_pool=True)
    groups = mae.lr_decay.param_groups_lrd(off, cfg.weight_decay, no_weight_decay_list=off.no_weight_decay(),
                                           layer_decay=cfg.layer_decay)
    off_opt = torch.optim.AdamW(groups, lr=1.0)
    want = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n, p in off.named_parameters()
            if any(p is q for q in g["params"])}
    ours, _ = build_finetune_model(str(_stub_checkpoint(tmp_path / "stub.pth", off)), cfg, 1000)
    opt = build_optimizer(ours, cfg, lr=1.0)
    names = {id(p): n for n, p in ours.named_parameters()}
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:6]
    bad = [n for n in want if got[n] != want[n]]
    assert not bad, [(n, got[n], want[n]) for n in bad[:5]]
    assert len(opt.param_groups) == len(groups)
    assert type(opt) is type(off_opt)
    for k in ("betas", "eps", "amsgrad", "maximize"):
        assert opt.defaults[k] == off_opt.defaults[k], k
    print(f"{arch}: {len(want)} parameters, lr scale and weight decay differ for 0; {len(groups)} groups")


class _Recorder(nn.Module):
    """Criterion wrapper recording every group's lr at each forward (the official loop's view)."""

    def __init__(self, crit, opt, log):
        super().__init__()
        self.crit, self.opt, self.log = crit, opt, log

    def forward(self, out, y):
        self.log.append([g["lr"] for g in self.opt.param_groups])
        return self.crit(out, y)


@pytest.mark.parametrize("accum", [1, 4])
def test_per_iteration_lr_and_updates_equal_official(mae, accum, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    off = official_vit(mae, 32, 5, True, embed_dim=32, depth=2, heads=2)
    ours = copy.deepcopy(off)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(10)]
    cfg = preset("finetune", "smoke", "epochs=3", "warmup_epochs=1", "min_lr=1e-4", f"accum_iter={accum}",
                 "layer_decay=0.65", "weight_decay=0.05", "clip_grad=None")
    lr = 1e-2
    args = argparse.Namespace(accum_iter=accum, lr=lr, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs,
                              epochs=cfg.epochs)
    off_opt = torch.optim.AdamW(mae.lr_decay.param_groups_lrd(off, 0.05, off.no_weight_decay(), 0.65), lr=lr)
    our_opt = build_optimizer(ours, cfg, lr)
    off_log, our_log = [], []
    crit = _Recorder(nn.CrossEntropyLoss(), off_opt, off_log)
    scaler = mae.misc.NativeScalerWithGradNormCount()

    def loss_fn(x, y):
        our_log.append([gr["lr"] for gr in our_opt.param_groups])
        return nn.functional.cross_entropy(ours(x), y)
    for epoch in range(cfg.epochs):
        off.train(), ours.train()
        mae.engine_finetune.train_one_epoch(off, crit, loader, off_opt, torch.device("cpu"), epoch, scaler,
                                            max_norm=None, mixup_fn=None, log_writer=None, args=args)
        C.train_one_epoch(epoch, cfg=cfg, loader=loader, optimizer=our_opt, lr=lr, loss_fn=loss_fn, ckpt=None,
                          params=ours.parameters())
    assert len(off_log) == len(our_log) == 30
    # group order may differ: compare the sorted lrs of each iteration (every group has its own scale)
    rel = max(abs(a - b) / max(abs(a), 1e-30) for lo, lu in zip(off_log, our_log) for a, b in zip(sorted(lo), sorted(lu)))
    assert rel == 0.0, rel
    assert len({tuple(sorted(x)) for x in off_log}) == 3 * math.ceil(10 / accum)  # set every accum_iter iterations
    wdiff = max((a - b).abs().max().item() for a, b in zip(off.parameters(), ours.parameters()))
    assert wdiff <= 1e-6, wdiff
    print(f"accum {accum}: {len(off_log)} iterations x {len(off_log[0])} groups, max relative lr difference {rel}, "
          f"max weight difference after 3 epochs {wdiff:.2e}")


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def test_probe_transforms_equal_official(mae, images):
    from torchvision import transforms as T
    ns = run_block("main_linprobe.py", ("transform_train = ", "transform_val = "), transforms=T,
                   RandomResizedCrop=mae.crop.RandomResizedCrop)
    ours_train, ours_val = linprobe_train_transform(224), eval_transform(224)
    tv_crop = T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC)  # the crop used before
    draws, differ_tv, px = 0, 0, 0
    for i, img in enumerate(images):
        assert torch.equal(ours_val(img), ns["transform_val"](img)), IMAGES[i]
        for k in range(40):
            _seed(1000 * i + k)
            ref = ns["transform_train"](img)
            _seed(1000 * i + k)
            got = ours_train(img)
            assert torch.equal(got, ref), (IMAGES[i], img.size, k, int((got != ref).sum()))
            _seed(1000 * i + k)
            box = mae.crop.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
            _seed(1000 * i + k)
            differ_tv += box != T.RandomResizedCrop.get_params(img, tv_crop.scale, tv_crop.ratio)
            draws += 1
            px += ref.numel()
    # the draws exercise the clamping: torchvision's retrying crop would differ in many of them
    assert differ_tv >= draws // 10, (differ_tv, draws)
    print(f"probe train transform: {draws} seeded draws on {len(images)} images ({sorted({im.size for im in images})}), "
          f"{px} values, 0 differ; torchvision's RandomResizedCrop would differ in {differ_tv} draws; "
          f"val transform: {len(images)} images, 0 differ")


def test_finetune_transforms_equal_official(mae, images, monkeypatch):
    from PIL import ImageOps
    monkeypatch.setattr(ImageOps, "posterize", _old_posterize)
    cmd = next(c for c in finetune_md_commands() if c["args"].model == "vit_base_patch16" and c["section"] == "finetune")
    cfg = preset("finetune", "paper_vit_base")
    ref_train = mae.datasets.build_transform(True, cmd["args"])
    ours_train = finetune_train_transform(dict(cfg.aug, input_size=cfg.input_size))
    n = 0
    for i, img in enumerate(images):
        for k in range(38):
            _seed(7000 + 100 * i + k)
            ref = ref_train(img)
            _seed(7000 + 100 * i + k)
            got = ours_train(img)
            assert torch.equal(got, ref), (IMAGES[i], k, int((got != ref).sum()))
            n += 1
    m = 0
    for size in (224, 384):
        ref_eval = mae.datasets.build_transform(False, argparse.Namespace(input_size=size))
        for img in images:
            assert torch.equal(eval_transform(size)(img), ref_eval(img)), (size, img.size)
            m += 1
    print(f"fine-tuning train transform: {n} seeded draws at 224 px, 0 pixels differ; eval: {m} (224 and 384 px), 0 differ")


# --------------------------------------------------------------------------------------------------
# Mixup / criterion
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [(), ("mixup=0.0", "cutmix=0.0"), ("mixup=0.0", "cutmix=0.0", "smoothing=0.0")])
def test_mixup_and_criterion_equal_official(mae, images, opts):
    from timm.data.mixup import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    cmd = next(c for c in finetune_md_commands() if c["args"].model == "vit_base_patch16" and c["section"] == "finetune")
    a = copy.copy(cmd["args"])
    cfg = preset("finetune", "paper_vit_base", *opts)
    a.mixup, a.cutmix, a.smoothing = cfg.mixup, cfg.cutmix, cfg.smoothing
    ns = run_block("main_finetune.py", ("mixup_fn = None", "mixup_active = ", "if mixup_active:",
                                        "if mixup_fn is not None:"),
                   args=a, Mixup=Mixup, SoftTargetCrossEntropy=SoftTargetCrossEntropy,
                   LabelSmoothingCrossEntropy=LabelSmoothingCrossEntropy)
    mix, crit = build_mixup(cfg, cfg.data.num_classes), build_criterion(cfg, build_mixup(cfg, cfg.data.num_classes))
    assert type(crit) is type(ns["criterion"]) and (mix is None) == (ns["mixup_fn"] is None)
    assert getattr(crit, "smoothing", None) == getattr(ns["criterion"], "smoothing", None)
    t = eval_transform(64)
    x0 = torch.stack([t(im) for im in images])
    y0 = torch.arange(len(images)) * 97 % 1000
    diff, kinds = 0.0, set()
    for k in range(24):
        x, y = x0.clone(), y0.clone()
        if mix is not None:
            _seed(k)
            xr, yr = ns["mixup_fn"](x.clone(), y.clone())
            _seed(k)
            x, y = mix(x.clone(), y.clone())
            assert torch.equal(x, xr) and torch.equal(y, yr), k
            _seed(k)
            kinds.add("cutmix" if mix._params_per_batch()[1] else "mixup")  # the same draws again
        logits = torch.randn(len(y), 1000, generator=torch.Generator().manual_seed(k))
        diff = max(diff, (crit(logits, y) - ns["criterion"](logits, y)).abs().item())
    assert diff == 0.0
    if mix is not None:
        assert kinds == {"mixup", "cutmix"}
    print(f"{opts or 'FINETUNE.md'}: criterion {type(crit).__name__}, 24 batches of {len(images)} real images, "
          f"mixed inputs/targets and losses differ by {diff}")


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 96])
def test_finetune_model_equals_official(mae, images, tiny_mae_official, size):
    cfg = preset("finetune", "paper_vit_base", "arch=vit_tiny_patch16", f"input_size={size}", "drop_path=0.1")
    torch.manual_seed(0)
    off = official_vit(mae, size, 10, True, drop_path=0.1)
    load_official_checkpoint("main_finetune.py", off, tiny_mae_official, mae)
    torch.manual_seed(0)
    ours, _ = build_finetune_model(str(tiny_mae_official), cfg, 10)
    sd_o, sd = off.state_dict(), ours.state_dict()
    assert set(sd) == set(sd_o), sorted(set(sd) ^ set(sd_o))
    wdiff = max((sd[k] - sd_o[k]).abs().max().item() for k in sd)
    assert wdiff <= 1e-6, [(k, (sd[k] - sd_o[k]).abs().max().item()) for k in sd if not torch.allclose(sd[k], sd_o[k])][:4]
    assert [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in ours.blocks] == \
        [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in off.blocks]
    x = torch.stack([eval_transform(size)(im) for im in images])
    off.eval(), ours.eval()
    with torch.no_grad():
        d_eval = (ours(x) - off(x)).abs().max().item()
    off.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(5)
        yo = off(x)
        torch.manual_seed(5)
        yu = ours(x)
        torch.manual_seed(6)
        d_other = (off(x) - yo).abs().max().item()
    d_train = (yu - yo).abs().max().item()
    assert d_eval <= 1e-5 and d_train <= 1e-5, (d_eval, d_train)
    assert d_other > 100 * d_train + 1e-6  # drop path is active in train mode: another seed, another output
    print(f"fine-tune model at {size} px: {len(sd)} tensors max diff {wdiff:.1e}; forward on {len(images)} images "
          f"eval {d_eval:.1e}, train (drop path 0.1, seeded) {d_train:.1e}")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_probe_features_and_lars_equal_official(mae, images, tiny_mae_official, pool):
    cfg = preset("linprobe", "paper_vit_base", "arch=vit_tiny_patch16", "input_size=64", f"global_pool={pool}")
    off = official_vit(mae, 64, 10, pool == "avg")
    args = argparse.Namespace(lr=0.1 * 256 / 256, weight_decay=cfg.weight_decay)
    ns = load_official_checkpoint("main_linprobe.py", off, tiny_mae_official, mae)
    ns = run_block("main_linprobe.py", ("model.head = ", "for _, p in model.named_parameters():",
                                        "for _, p in model.head.named_parameters():", "optimizer = LARS("),
                   model=off, model_without_ddp=off, args=args, LARS=mae.lars.LARS)
    off_opt = ns["optimizer"]
    encoder, _ = build_encoder(str(tiny_mae_official), cfg)
    ours = LinearProbe(encoder, 10, pool)
    ours.head.load_state_dict(off.head.state_dict())
    opt = LARS(ours.head.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
    assert [n for n, p in off.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert sum(p.requires_grad for p in ours.parameters()) == 2
    t = eval_transform(64)
    x = torch.stack([t(im) for im in images])
    off.eval()
    with torch.no_grad():
        d_feat = (encoder(x, -1, pool) - off.forward_features(x)).abs().max().item()
    assert d_feat <= 1e-5, d_feat
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 10, (len(images),), generator=g)
    sched = argparse.Namespace(lr=args.lr, min_lr=0.0, warmup_epochs=2, epochs=6)
    d_step = 0.0
    for step in range(12):
        e = step / 2
        mae.lr_sched.adjust_learning_rate(off_opt, e, sched)
        C.adjust_learning_rate(opt, e, sched.lr, sched.min_lr, sched.warmup_epochs, sched.epochs)
        xb = x + 0.1 * torch.randn(x.shape, generator=g)
        off.train(True), ours.train()
        for m, o in ((off, off_opt), (ours, opt)):
            nn.functional.cross_entropy(m(xb), y).backward()
            o.step()
            o.zero_grad()
        d_step = max(d_step, max((a - b).abs().max().item() for a, b in
                                 zip(list(off.head.state_dict().values()), list(ours.head.state_dict().values()))
                                 if a.is_floating_point()))
    assert d_step <= 1e-5, d_step
    off.eval(), ours.eval()
    with torch.no_grad():
        d_logit = (ours(x) - off(x)).abs().max().item()
    assert d_logit <= 1e-4, d_logit
    print(f"probe {pool}: features of {len(images)} images max diff {d_feat:.1e}; 12 LARS steps (BN head, "
          f"warmup+cosine): head weights / BN statistics max diff {d_step:.1e}, final logits {d_logit:.1e}")
