"""Protocol pieces checked against independent re-statements of the reference rules: MAE layer-wise
lr decay ids, MAE's LARS update, DINO's weighted kNN, the train hold-out split and the feature cache."""
from __future__ import annotations

import math

import pytest
import torch
from mmengine.config import Config
from timm.models.vision_transformer import VisionTransformer

from transfer.classification.data import ImageDataset, eval_transform, load_inat2019
from transfer.classification.feature_cache import FeatureCache, FeatureEncoder
from transfer.classification.finetune import build_optimizer
from transfer.classification.lars import LARS
from transfer.classification.linprobe import holdout_split, knn_classify, select_best



# ------------------------------------------------------------------ layer decay
def mae_param_groups(model, weight_decay, layer_decay):
    """Independent re-statement of MAE util/lr_decay.param_groups_lrd + get_layer_id_for_vit:
    name -> (lr_scale, weight_decay)."""
    L = len(model.blocks)
    no_wd = {"pos_embed", "cls_token", "dist_token"}
    out = {}
    for n, p in model.named_parameters():
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            lid = 0
        elif n.startswith("blocks."):
            lid = int(n.split(".")[1]) + 1
        else:
            lid = L + 1
        wd = 0.0 if (p.ndim == 1 or n in no_wd) else weight_decay
        out[n] = (layer_decay ** (L + 1 - lid), wd)
    return out


@pytest.mark.parametrize("pool,depth", [("avg", 4), ("token", 4), ("avg", 12)])
def test_layer_decay_matches_mae(pool, depth):
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=depth, num_heads=2, num_classes=5,
                              global_pool=pool)
    cfg = Config(dict(weight_decay=0.05, layer_decay=0.65))
    opt = build_optimizer(model, cfg, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in opt.param_groups:
        for p in g["params"]:
            got[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    want = mae_param_groups(model, 0.05, 0.65)
    assert set(got) == set(want)
    for n in want:
        assert got[n][0] == pytest.approx(want[n][0], rel=1e-12), n
        assert got[n][1] == want[n][1], n
    assert got["head.weight"][0] == 1.0 and got["cls_token"][0] == pytest.approx(0.65 ** (depth + 1))
    assert type(opt).__name__ == "AdamW" and opt.defaults["betas"] == (0.9, 0.999)


# ------------------------------------------------------------------ LARS
def test_lars_matches_reference_update():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    z = torch.zeros(2, 2, requires_grad=True)  # zero norm -> trust ratio 1
    opt = LARS([w, b, z], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    ref = {k: v.detach().clone() for k, v in (("w", w), ("b", b), ("z", z))}
    mu = {k: torch.zeros_like(v) for k, v in ref.items()}
    for step in range(2):
        grads = {"w": torch.randn(4, 3), "b": torch.randn(4), "z": torch.randn(2, 2)}
        for k, p in (("w", w), ("b", b), ("z", z)):
            p.grad = grads[k].clone()
        opt.step()
        for k in ref:
            g = grads[k]
            if ref[k].ndim > 1:
                g = g + 0.1 * ref[k]
                pn, un = ref[k].norm().item(), g.norm().item()
                q = 0.001 * pn / un if pn > 0 and un > 0 else 1.0
                g = g * q
            mu[k] = 0.9 * mu[k] + g
            ref[k] = ref[k] - 0.5 * mu[k]
        for k, p in (("w", w), ("b", b), ("z", z)):
            torch.testing.assert_close(p.detach(), ref[k], rtol=1e-6, atol=1e-7)


def test_stacked_lars_equals_one_lars_per_head():
    from transfer.classification.lars import StackedLARS
    torch.manual_seed(1)
    W = torch.randn(3, 5, 4)
    b = torch.randn(3, 5)
    lrs = torch.tensor([0.1, 1.0, 7.0])
    Ws, bs = W.clone().requires_grad_(), b.clone().requires_grad_()
    stacked = StackedLARS([{"params": [Ws, bs], "lr_vec": lrs}], lr_vec=lrs, weight_decay=0.01)
    singles = [(W[i].clone().requires_grad_(), b[i].clone().requires_grad_()) for i in range(3)]
    opts = [LARS(list(p), lr=lrs[i].item(), weight_decay=0.01) for i, p in enumerate(singles)]
    for _ in range(3):
        gW, gb = torch.randn(3, 5, 4), torch.randn(3, 5)
        Ws.grad, bs.grad = gW.clone(), gb.clone()
        stacked.step()
        for i, (w, bb) in enumerate(singles):
            w.grad, bb.grad = gW[i].clone(), gb[i].clone()
            opts[i].step()
    for i, (w, bb) in enumerate(singles):
        torch.testing.assert_close(Ws[i].detach(), w.detach())
        torch.testing.assert_close(bs[i].detach(), bb.detach())


# ------------------------------------------------------------------ kNN
def test_knn_weighted_votes_by_hand():
    """Two queries where DINO's exp(cos/T) weighting decides: query A's single very close neighbour
    outweighs two farther ones of another class (a plain majority vote gets A wrong); query B's two
    slightly farther neighbours outweigh its nearest one (nearest-neighbour-only gets B wrong)."""
    ang = torch.tensor([0.05, 0.6, -0.6, 1.87, 1.22, 1.92, 3.0])
    ytr = torch.tensor([0, 1, 1, 2, 1, 1, 2])
    tr = torch.stack([ang.cos(), ang.sin()], 1) * 3.0  # scale must not matter (cosine)
    q_ang = torch.tensor([0.0, 1.57])
    te = torch.stack([q_ang.cos(), q_ang.sin()], 1)
    yte = torch.tensor([0, 1])
    T = 0.07

    def votes(qa, k, temp):  # the vote of each class among the k nearest, by hand
        d = (ang - qa).abs()
        near = d.argsort()[:k]
        out = [0.0, 0.0, 0.0]
        for i in near.tolist():
            out[int(ytr[i])] += math.exp(math.cos(float(d[i])) / temp)
        return out

    def argmax(v):
        return max(range(len(v)), key=v.__getitem__)

    # the premises: weighting changes the decision against both simpler rules
    assert [argmax(votes(float(a), 3, T)) for a in q_ang] == [0, 1]  # weighted: both right
    majority = [argmax([sum(1 for i in (ang - a).abs().argsort()[:3].tolist() if int(ytr[i]) == c)
                        for c in range(3)]) for a in q_ang.tolist()]
    assert majority == [1, 1]  # unweighted: query A wrong
    assert [int(ytr[(ang - a).abs().argmin()]) for a in q_ang.tolist()] == [0, 2]  # nearest only: B wrong
    r = knn_classify(tr, ytr, te, yte, num_classes=3, k=3, T=T)
    assert r["top1"] == 100.0 and r["top5"] == 100.0
    # a huge temperature flattens the weights into a majority vote: query A becomes wrong
    r_flat = knn_classify(tr, ytr, te, yte, num_classes=3, k=3, T=1000.0)
    assert r_flat["top1"] == 50.0
    r1 = knn_classify(tr, ytr, te, yte, num_classes=3, k=1, T=T)
    assert r1["top1"] == 50.0  # k=1: B's nearest neighbour has label 2
    r_big = knn_classify(tr, ytr, te, yte, num_classes=3, k=100)  # k capped at the train size
    assert 0 <= r_big["top1"] <= 100


# ------------------------------------------------------------------ hold-out selection
def test_holdout_split_and_selection():
    fit, hold = holdout_split(120, 0.25, seed=3)
    assert len(hold) == 30 and len(fit) == 90
    assert set(fit.tolist()).isdisjoint(hold.tolist()) and set(fit.tolist()) | set(hold.tolist()) == set(range(120))
    fit2, hold2 = holdout_split(120, 0.25, seed=3)
    assert torch.equal(hold, hold2)
    assert not torch.equal(hold, holdout_split(120, 0.25, seed=4)[1])
    scores = {("a", 0): {"top1": 50.0, "loss": 1.0}, ("a", 1): {"top1": 60.0, "loss": 2.0},
              ("b", 0): {"top1": 60.0, "loss": 1.5}}
    assert select_best(scores) == ("b", 0)
    from crossmae.utils import UserError
    with pytest.raises(UserError, match="holdout_fraction"):
        holdout_split(3, 0.9, 0)


# ------------------------------------------------------------------ feature cache
def test_feature_cache_hit_and_invalidation(data_root, tiny_crossmae_ckpt, tmp_path):  # noqa: F811
    from crossmae import load_backbone
    from torch.utils.data import DataLoader
    vit, report = load_backbone(tiny_crossmae_ckpt, arch="vit_tiny_patch16", img_size=32, global_pool="token")
    enc = FeatureEncoder(vit, report.has_final_norm)
    data = load_inat2019(data_root / "inat2019", "val")
    data.samples = data.samples[:6]
    t = eval_transform(32)
    loader = DataLoader(ImageDataset(data, t), batch_size=4)
    cache = FeatureCache(tmp_path / "cache")
    base = dict(checkpoint_sha256=report.sha256, arch="vit_tiny_patch16", img_size=32, norm=enc.norm_kind,
                transform=repr(t), data_fingerprint=data.fingerprint(), split="val")
    specs = [(3, "token"), (3, "avg"), (1, "token")]
    a = cache.get_or_extract(enc, loader, specs, base_key=base, device=torch.device("cpu"))
    assert cache.stats == {"hits": 0, "misses": 3}
    b = cache.get_or_extract(enc, loader, specs, base_key=base, device=torch.device("cpu"))
    assert cache.stats == {"hits": 3, "misses": 3}
    for s in specs:
        assert torch.equal(a[s][0], b[s][0]) and a[s][0].shape == (6, 64)
    # the stored features are what the encoder computes
    x = torch.stack([ImageDataset(data, t)[i][0] for i in range(6)])
    torch.testing.assert_close(b[(3, "avg")][0].float(), enc(x, 3, "avg"), rtol=2e-3, atol=2e-3)
    # every key component invalidates
    for change in (dict(checkpoint_sha256="0" * 64), dict(transform=repr(eval_transform(48))),
                   dict(data_fingerprint="x"), dict(img_size=48), dict(norm="other")):
        cache.stats = {"hits": 0, "misses": 0}
        cache.get_or_extract(enc, loader, [(3, "token")], base_key={**base, **change}, device=torch.device("cpu"))
        assert cache.stats == {"hits": 0, "misses": 1}, change
    cache.stats = {"hits": 0, "misses": 0}
    cache.get_or_extract(enc, loader, [(2, "token"), (3, "token")], base_key=base, device=torch.device("cpu"))
    assert cache.stats == {"hits": 1, "misses": 1}  # other layer: miss; same layer: hit
    # a file whose stored key disagrees (stale / collided) is not trusted
    key = cache.make_key(block=3, pooling="avg", **base)
    obj = torch.load(cache.path_for(key))
    obj["key"] = dict(obj["key"], checkpoint_sha256="f" * 64)
    torch.save(obj, cache.path_for(key))
    assert cache.load(key) is None
    # a file with the right key but shapes that do not fit (N features vs M labels, 1-D features,
    # float labels) is a miss too, never handed to the probe
    good = cache.make_key(block=3, pooling="token", **base)
    obj = torch.load(cache.path_for(good))
    feats, labels = obj["features"], obj["labels"]
    for bad in (dict(labels=labels[:-1]), dict(features=feats[:, 0]), dict(labels=labels.float())):
        torch.save({**obj, **bad}, cache.path_for(good))
        assert cache.load(good) is None, list(bad)
    torch.save(obj, cache.path_for(good))
    assert cache.load(good) is not None


def test_crossmae_token_feature_uses_parameter_free_norm(tiny_crossmae_ckpt):  # noqa: F811
    from crossmae import load_backbone
    vit, report = load_backbone(tiny_crossmae_ckpt, arch="vit_tiny_patch16", img_size=32, global_pool="token")
    assert report.has_final_norm is False
    enc = FeatureEncoder(vit, report.has_final_norm)
    x = torch.randn(2, 3, 32, 32)
    h = enc.block_outputs(x, [3])[3]
    want = torch.nn.functional.layer_norm(h[:, 0], (64,), eps=1e-6)
    torch.testing.assert_close(enc(x, -1, "token"), want)
    assert enc.norm_kind == "paramfree_ln"


# ------------------------------------------------------------------ fine-tuning model, loss, presets
def test_finetune_model_head_pool_and_pos_embed(tiny_crossmae_ckpt):  # noqa: F811
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from transfer.classification.finetune import build_criterion, build_finetune_model, build_mixup
    cfg = Config(dict(arch="vit_tiny_patch16", input_size=32, global_pool="avg", drop_path=0.1,
                      head_init_std=2e-5, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0,
                      mixup_switch_prob=0.5, mixup_mode="batch", smoothing=0.1))
    torch.manual_seed(0)
    model, report = build_finetune_model(str(tiny_crossmae_ckpt), cfg, num_classes=7)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.pos_embed_resized is not None  # 64 px checkpoint -> 32 px model: bicubic resize
    assert model.pos_embed.shape == (1, 1 + 4, 64)
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.Identity)
    assert model.global_pool == "avg" and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    # timm/MAE trunc_normal_ truncates at +-2 ABSOLUTE (a=-2, b=2), so at std 2e-5 it is a plain normal
    assert 1.5e-5 < model.head.weight.std().item() < 2.5e-5
    assert torch.count_nonzero(model.head.bias) == 0
    mix = build_mixup(cfg, 7)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.mode) == (0.8, 1.0, 0.1, "batch")
    assert isinstance(build_criterion(cfg, mix), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(cfg, None), LabelSmoothingCrossEntropy)


def test_paper_presets_carry_reference_values():
    from crossmae.utils import REPO_ROOT
    c = lambda p: Config.fromfile(str(REPO_ROOT / "configs" / p))  # noqa: E731
    b = c("finetune/paper_vit_base.py")
    assert (b.epochs, b.total_batch_size, b.blr, b.layer_decay, b.drop_path, b.weight_decay, b.warmup_epochs,
            b.min_lr) == (100, 1024, 5e-4, 0.65, 0.1, 0.05, 5, 1e-6)
    assert (b.aug.auto_augment, b.mixup, b.cutmix, b.smoothing, b.aug.reprob, b.global_pool, b.head_init_std,
            b.input_size) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25, "avg", 2e-5, 224)
    lg = c("finetune/paper_vit_large.py")
    assert (lg.epochs, lg.blr, lg.layer_decay, lg.drop_path, lg.arch) == (50, 1e-3, 0.75, 0.2, "vit_large_patch16")
    lp = c("linprobe/paper_vit_base.py")
    assert (lp.epochs, lp.total_batch_size, lp.blr, lp.weight_decay, lp.warmup_epochs, lp.min_lr, lp.protocol) == \
        (90, 16384, 0.1, 0.0, 10, 0.0, "mae")
    for ds, n in (("inat", 1010), ("places", 365)):
        d = c(f"{ds}/paper_vit_base.py")
        assert d.data.num_classes == n and d.blr == 5e-4 and d.family == "finetune"
        assert c(f"{ds}/linprobe_paper_vit_base.py").family == "linprobe"


# ------------------------------------------------------------------ the probe's crop (MAE util/crop.py)
def test_probe_crop_is_one_clamped_draw(data_root):
    """``ClampedRandomResizedCrop``: equal to torchvision's crop whenever torchvision's first draw fits
    (same random numbers, same order), otherwise the first draw with the overflowing side clamped to the
    image — never a retry or a centre-crop fallback. Real images: 4:3, square, wide."""
    from torchvision import transforms as T

    from crossmae.data import load_rgb
    from transfer.classification.data import ClampedRandomResizedCrop, linprobe_train_transform
    assert isinstance(linprobe_train_transform(32).transforms[0], ClampedRandomResizedCrop)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    fits = clamped = 0
    for rel in ("n04443257/n04443257_tobacco_shop.JPEG", "n04254680/n04254680_soccer_ball.JPEG",
                "n01882714/n01882714_koala.JPEG"):
        img = load_rgb(str(data_root / "imagenet" / "train" / rel))
        W, H = img.size
        for k in range(60):
            torch.manual_seed(k)
            top, left, h, w = ClampedRandomResizedCrop.get_params(img, scale, ratio)
            after = torch.rand(1)  # the generator advanced by exactly the draws of one attempt
            torch.manual_seed(k)
            tv = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
            assert 0 <= top <= H - h and 0 <= left <= W - w and h >= 1 and w >= 1
            if h < H and w < W:  # nothing clamped: torchvision's first attempt fitted too
                assert (top, left, h, w) == tv
                fits += 1
            else:  # clamped: one side spans the image, the other keeps the drawn aspect ratio
                assert h == H or w == W
                clamped += 1
            torch.manual_seed(k)
            for _ in range(2):
                torch.empty(1).uniform_(0, 1)
            torch.randint(0, 2, (1,)), torch.randint(0, 2, (1,))
            assert torch.equal(after, torch.rand(1))
    assert fits > 60 and clamped > 20, (fits, clamped)
    out = ClampedRandomResizedCrop(48)(img)
    assert out.size == (48, 48)
