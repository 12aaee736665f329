"""Linear probing of a frozen pretrained ViT: four protocols behind one command.

``protocol`` (config key, or ``--protocol``):

* ``mae``: the MAE protocol (facebookresearch/mae ``main_linprobe.py``): frozen encoder, head =
  ``BatchNorm1d(D, affine=False, eps=1e-6)`` + ``Linear`` (weight trunc_normal std 0.01), LARS
  (``transfer.classification.lars``; momentum 0.9, trust 0.001), lr = blr·batch/256, wd 0, per-iteration warmup +
  cosine (min lr 0), RandomResizedCrop + flip, eval Resize + CenterCrop. Pooling ``global_pool``:
  ``token`` or ``avg`` (definitions and the CrossMAE no-final-norm rule in ``transfer.classification.feature_cache``).
* ``fast``: features extracted ONCE with the eval transform and cached on disk
  (``transfer.classification.feature_cache``), then a grid of heads trained together in one pass per epoch over the
  cached features: ``fast.blrs`` × {token, avg} × {last block, concatenation of the last 4 blocks},
  each head BN(affine=False)+Linear with LARS and the MAE schedule. The best head is chosen on a
  held-out part of the TRAIN split (``fast.holdout_fraction``, seeded); val is only used to report the
  chosen head. A kNN classifier (``knn``) on the same cache is reported alongside.
* ``blocks``: the fast path on every encoder block (grid blrs × {token, avg} per block, selection per
  block on the train hold-out); writes ``blocks.json`` and ``blocks.png`` (val top-1 per block).
* ``knn``: DINO's weighted kNN (``eval_knn.py``: cosine similarity of L2-normalised features, k = 20,
  votes weighted by exp(sim / 0.07)) on the cached last-block features.

Usage::

    python -m transfer.linprobe --backbone ckpt.pth --config paper_vit_base --output-dir out/lp
    python -m transfer.linprobe --backbone ckpt.pth --config smoke --protocol fast --output-dir out/lpf
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from crossmae import engine
from crossmae.checkpoint import unwrap
from crossmae.utils import UserError, atomic_write_bytes, atomic_write_json, resolve_data_root, seed_everything

from . import common as C
from .data import ImageDataset, describe_transform, eval_transform, linprobe_train_transform, load_train_val
from .feature_cache import POOLINGS, FeatureCache, FeatureEncoder
from .lars import LARS, StackedLARS

PRESET_DIR = C.CONFIG_ROOT / "linprobe"
PROTOCOLS = ("mae", "fast", "blocks", "knn")
LAYER_SETS = ("last", "last4")
#: Called as ``hook(epoch)`` after each epoch's checkpoint is written (tests simulate preemption).
EPOCH_END_HOOK = None


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def bn_linear_head(dim: int, num_classes: int, init_std: float = 0.01) -> nn.Sequential:
    """MAE probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)`` then ``Linear(dim, C)`` with weight
    trunc_normal(std 0.01), bias 0. Input (B, dim) → logits (B, C)."""
    from timm.layers import trunc_normal_
    lin = nn.Linear(dim, num_classes)
    trunc_normal_(lin.weight, std=init_std)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), lin)


class LinearProbe(nn.Module):
    """Frozen :class:`FeatureEncoder` (always in eval mode, no grad) + trainable BN/Linear head.

    Input (B, 3, H, W) → logits (B, C). Feature: the last block with ``pooling`` (``token``/``avg``).
    """

    def __init__(self, encoder: FeatureEncoder, num_classes: int, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"config global_pool={pooling!r}: expected one of {POOLINGS}")
        self.encoder, self.pooling = encoder, pooling
        self.head = bn_linear_head(encoder.dim, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = self.encoder(x, -1, self.pooling)
        return self.head(f.float())


def build_encoder(backbone: str, cfg) -> tuple[FeatureEncoder, object]:
    """The frozen encoder of ``backbone`` (timm ViT, cls-token model, no head) and its LoadReport."""
    vit, report = C.load_cls_backbone(backbone, cfg, num_classes=0, global_pool="token")
    return FeatureEncoder(vit, report.has_final_norm), report


# --------------------------------------------------------------------------------------------------
# protocol 1: MAE linear probe
# --------------------------------------------------------------------------------------------------
def _mae_probe(ctx) -> tuple[dict, dict]:
    cfg, device, log = ctx["cfg"], ctx["device"], ctx["log"]
    train_ds = ImageDataset(ctx["train"], linprobe_train_transform(cfg.input_size))
    val_ds = ImageDataset(ctx["val"], eval_transform(cfg.input_size))
    model = LinearProbe(ctx["encoder"], ctx["train"].num_classes, cfg.global_pool).to(device)
    run = ctx["run"]
    per_gpu, accum, total, lr = C.batch_and_lr(cfg, run.world)
    optimizer = LARS(model.head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    head = run.wrap_ddp(model.head)
    sampler, train_loader, val_loader = C.make_loaders(cfg, train_ds, val_ds, per_gpu, run.rank, run.world)
    criterion = nn.CrossEntropyLoss()
    amp = C.amp_dtype_for(device, cfg)
    start, history, prev, _ = C.resume_state(run, model.head, optimizer)
    timer = C.Timer(prev)
    log.info(f"mae probe: {len(train_ds)} train / {len(val_ds)} val, pooling {cfg.global_pool}, lr {lr:.4g} "
             f"(blr {cfg.blr}, batch {total} = {per_gpu} x {run.world} x accum {accum}), {cfg.epochs} epochs")

    def loss_fn(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with engine.autocast(device, amp):
            with torch.no_grad():
                f = model.encoder(x, -1, cfg.global_pool)
            return criterion(head(f.float()), y)

    rows = ctx["rows"]
    predicted = False
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        rec = C.train_one_epoch(epoch, cfg=cfg, loader=train_loader, optimizer=optimizer, lr=lr, loss_fn=loss_fn,
                                ckpt=run.ckpt, accum_iter=accum)
        if C.eval_due(cfg, epoch):
            last = epoch + 1 == cfg.epochs
            rec.update(C.evaluate(model, val_loader, device, amp, collect=rows if last else None))
            predicted = predicted or last
        history.append(rec)
        _epoch_end(ctx, rec, {"model": unwrap(model.head).state_dict(), "optimizer": optimizer.state_dict()},
                   history, timer)
    if not predicted:  # resumed after the last epoch's checkpoint
        C.evaluate(model, val_loader, device, amp, collect=rows)
    metrics = C.final_metrics(history)
    return metrics, {"history": history, "selection_split": "none (final epoch on val)",
                     "pooling": cfg.global_pool, "feature_norm": ctx["encoder"].norm_kind, "wall_time": timer.elapsed}


def _epoch_end(ctx, rec: dict, state: dict, history: list, timer, save: bool = True) -> None:
    C.epoch_end(ctx["run"], rec, task=ctx["task"], history=history, timer=timer, state=state if save else None,
                hook=EPOCH_END_HOOK)


# --------------------------------------------------------------------------------------------------
# fast path: cached features + many heads in one pass
# --------------------------------------------------------------------------------------------------
def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, holdout)`` of a seeded random split of the TRAIN set (DINO/BYOL-style
    validation-on-train for hyper-parameter selection). ``holdout`` has ``max(1, round(f·n))`` items.

    Raises:
        UserError: the fraction leaves no training or no held-out sample.
    """
    k = max(1, int(round(fraction * n)))
    if not 0 < fraction < 1 or k >= n:
        raise UserError(f"config fast.holdout_fraction={fraction}: leaves no train or held-out images of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def feature_types(kind: str, depth: int, pools=POOLINGS, layers=LAYER_SETS) -> dict[str, list[tuple[int, str]]]:
    """Named feature types → the (block, pooling) entries concatenated into them.

    ``kind='fast'``: ``{pool}_{layers}`` with layers ``last`` (block L-1) or ``last4`` (blocks L-4..L-1,
    concatenated in block order). ``kind='blocks'``: ``b{i}_{pool}`` for every block i.
    """
    out = {}
    if kind == "blocks":
        for b in range(depth):
            for p in pools:
                out[f"b{b}_{p}"] = [(b, p)]
        return out
    for p in pools:
        for layer in layers:
            if layer not in LAYER_SETS:
                raise UserError(f"config fast.layers: {layer!r} is not one of {LAYER_SETS}")
            blocks = [depth - 1] if layer == "last" else list(range(max(depth - 4, 0), depth))
            out[f"{p}_{layer}"] = [(b, p) for b in blocks]
    return out


class MultiHead(nn.Module):
    """Many BN(affine=False)+Linear heads trained at once: for each feature type one BatchNorm1d
    (parameter-free, shared by its heads) and ``n_lr`` linear heads stored as one stack
    (weight (n_lr, C, D) trunc_normal std 0.01, bias (n_lr, C) zeros — MAE's head init per head).

    ``forward(feats)``: ``feats`` {type: (B, D_type)} → {type: logits (n_lr, B, C)}.
    """

    def __init__(self, dims: dict[str, int], n_lr: int, num_classes: int):
        from timm.layers import trunc_normal_
        super().__init__()
        self.types = list(dims)
        self.n_lr = n_lr
        self.bns = nn.ModuleDict({t: nn.BatchNorm1d(d, affine=False, eps=1e-6) for t, d in dims.items()})
        self.weights = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        for t, d in dims.items():
            w = torch.empty(n_lr, num_classes, d)
            for i in range(n_lr):
                trunc_normal_(w[i], std=0.01)
            self.weights[t] = nn.Parameter(w)
            self.biases[t] = nn.Parameter(torch.zeros(n_lr, num_classes))

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: torch.einsum("bd,hcd->hbc", self.bns[t](feats[t]), self.weights[t]) + self.biases[t][:, None]
                for t in self.types if t in feats}


def _gather(cached: dict, types: dict, idx: torch.Tensor | None, device) -> dict[str, torch.Tensor]:
    """Feature matrices per type (rows ``idx``) on ``device``, kept float16 (as cached; half the memory
    of float32 — ImageNet ViT-B ``last4`` is 1.28M × 3072); callers cast each batch to float32."""
    res = {}
    for t, specs in types.items():
        parts = [cached[s][0] if idx is None else cached[s][0][idx] for s in specs]
        res[t] = torch.cat(parts, 1).to(device)
    return res


@torch.no_grad()
def score_heads(heads: MultiHead, feats: dict[str, torch.Tensor], y: torch.Tensor, batch: int = 4096,
                only: tuple[str, int] | None = None) -> dict:
    """Top-1 / top-5 (%) and CE loss of every head (or only ``only``) on ``feats`` with eval-mode BN.
    Returns {(type, i): {'top1', 'top5', 'loss'}}."""
    heads.eval()
    n = len(y)
    acc = {}
    for s in range(0, n, batch):
        logits = heads({t: f[s:s + batch].float() for t, f in feats.items()})
        yy = y[s:s + batch]
        for t, out in logits.items():
            for i in range(out.shape[0]):
                if only is not None and (t, i) != only:
                    continue
                c1, c5 = C.topk_correct(out[i], yy)
                a = acc.setdefault((t, i), [0, 0, 0.0])
                a[0] += c1
                a[1] += c5
                a[2] += float(F.cross_entropy(out[i], yy, reduction="sum"))
    return {k: {"top1": 100.0 * a[0] / n, "top5": 100.0 * a[1] / n, "loss": a[2] / n} for k, a in acc.items()}


def select_best(scores: dict, keys=None):
    """The head with the highest hold-out top-1; ties → lower hold-out loss → grid order."""
    keys = list(scores) if keys is None else list(keys)
    order = {k: i for i, k in enumerate(keys)}
    return min(keys, key=lambda k: (-scores[k]["top1"], scores[k]["loss"], order[k]))


def train_heads(ctx, cached_train: dict, types: dict, fit_idx: torch.Tensor, hold_idx: torch.Tensor,
                num_classes: int) -> tuple[MultiHead, dict, list, float]:
    """Train a :class:`MultiHead` (types × ``fast.blrs``) on the ``fit`` rows of the cached TRAIN
    features with LARS + MAE's per-iteration warmup/cosine, one shared shuffled pass per epoch
    (deterministic: permutation seeded by seed+epoch). Resumable from the run's checkpoint.

    Heads are stacked per feature type and updated by :class:`StackedLARS` (= one LARS per head).
    Returns ``(heads, holdout_scores, history, wall_time)``; nothing here sees the val split.
    """
    cfg, fast, device = ctx["cfg"], ctx["cfg"].fast, ctx["device"]
    fit = _gather(cached_train, types, fit_idx, device)
    y_fit = next(iter(cached_train.values()))[1][fit_idx].to(device)
    hold = _gather(cached_train, types, hold_idx, device)
    y_hold = next(iter(cached_train.values()))[1][hold_idx].to(device)
    torch.manual_seed(cfg.seed)
    blrs = list(fast.blrs)
    heads = MultiHead({t: f.shape[1] for t, f in fit.items()}, len(blrs), num_classes).to(device)
    batch = min(fast.get("batch_size") or C.batch_and_lr(cfg, 1)[2], len(y_fit))  # one process: the total batch
    epochs = fast.get("epochs") or cfg.epochs
    warmup = fast.get("warmup_epochs") if fast.get("warmup_epochs") is not None else cfg.warmup_epochs
    peak = torch.tensor([blr * batch / 256 for blr in blrs], device=device)
    optimizer = StackedLARS([{"params": [heads.weights[t], heads.biases[t]], "lr_vec": peak.clone()}
                             for t in heads.types], lr_vec=peak.clone(), weight_decay=cfg.weight_decay)
    start, history, prev, state = C.resume_state(ctx["run"], heads, optimizer)
    diverged: set[tuple[str, int]] = {(t, int(i)) for t, i in (state or {}).get("diverged", [])}
    peaks = {t: peak.clone() for t in heads.types}
    for t, i in diverged:
        peaks[t][i] = 0.0
    timer = C.Timer(prev)
    n = len(y_fit)
    steps = n // batch  # drop_last, as the MAE loader
    ckpt_every = int(fast.get("checkpoint_period", 10))
    for epoch in range(start, epochs):
        heads.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)).to(device)
        tot, n_terms = 0.0, 0
        for it in range(steps):
            f = C.lr_at(it / steps + epoch, 1.0, 0.0, warmup, epochs)
            for t, g in zip(heads.types, optimizer.param_groups):
                g["lr_vec"] = f * peaks[t]
            idx = perm[it * batch:(it + 1) * batch]
            yb = y_fit[idx]
            logits = heads({t: x[idx].float() for t, x in fit.items()})
            # sum over heads of each head's mean CE: every head gets exactly its own gradient; a head
            # whose loss is non-finite is left out (its gradient is 0) and retired below
            loss = 0.0
            per_head = {}
            for t, o in logits.items():
                ce = F.cross_entropy(o.reshape(-1, o.shape[-1]), yb.repeat(o.shape[0]), reduction="none")
                per_head[t] = ce.view(o.shape[0], -1).mean(1)
                ok = torch.isfinite(per_head[t])
                loss = loss + torch.where(ok, per_head[t], torch.zeros_like(per_head[t])).sum()
                tot, n_terms = tot + float(per_head[t].detach()[ok].sum()), n_terms + int(ok.sum())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _retire_diverged(heads, optimizer, per_head, peaks, diverged, ctx["log"], epoch, it)
        if len(diverged) == len(heads.types) * len(blrs):
            raise ctx["ckpt"].diverged(f"epoch {epoch}: the loss of every head of the probe grid became non-finite")
        rec = {"epoch": epoch, "train_loss_mean": tot / max(n_terms, 1), "diverged_heads": len(diverged)}
        history.append(rec)
        save = (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs
        _epoch_end(ctx, rec, {"model": heads.state_dict(), "optimizer": optimizer.state_dict(),
                              "diverged": sorted([t, i] for t, i in diverged)}, history, timer, save=save)
    scores = score_heads(heads, hold, y_hold)
    for key in diverged:
        scores[key] = {"top1": None, "top5": None, "loss": None, "diverged": True}
    return heads, scores, history, timer.elapsed


@torch.no_grad()
def _retire_diverged(heads: MultiHead, optimizer, per_head: dict, peaks: dict, diverged: set, log, epoch: int,
                     it: int) -> None:
    """Retire every head whose loss is non-finite or whose (updated) weights are non-finite or
    overflowing (``crossmae.checkpoint.WEIGHT_LIMIT``): it is recorded in
    ``diverged``, its weights and LARS momentum are zeroed and its lr set to 0 (so the checkpoint
    stays finite), and it is never selected."""
    for t in heads.types:
        w, b = heads.weights[t], heads.biases[t]
        from crossmae.checkpoint import WEIGHT_LIMIT
        bad = ~torch.isfinite(per_head[t]) | ~(w.flatten(1).abs() < WEIGHT_LIMIT).all(1) | \
            ~(b.abs() < WEIGHT_LIMIT).all(1)
        for i in bad.nonzero().flatten().tolist():
            if (t, i) in diverged:
                continue
            diverged.add((t, i))
            peaks[t][i] = 0.0
            for p in (w, b):
                p[i] = 0.0
                mu = optimizer.state.get(p, {}).get("mu")
                if mu is not None:
                    mu[i] = 0.0
            log.info(f"fast probe: head {t} #{i} diverged at epoch {epoch} iteration {it}; retired")


def _usable(scores: dict, keys=None) -> list:
    """The keys of ``scores`` (or of ``keys``) whose head did not diverge."""
    return [k for k in (scores if keys is None else keys) if not scores[k].get("diverged")]


def _cache_features(ctx, specs, splits=("train", "val")) -> dict:
    """Cached features of ``specs`` for the given splits (eval transform, fixed order)."""
    from torch.utils.data import DataLoader
    cfg, enc = ctx["cfg"], ctx["encoder"]
    cache = ctx["cache"]
    t = eval_transform(cfg.input_size)
    res = {}
    for split in splits:
        data = ctx[split]
        loader = DataLoader(ImageDataset(data, t), batch_size=cfg.get("extract_batch_size", 256),
                            num_workers=cfg.num_workers, shuffle=False)
        base = dict(checkpoint_sha256=ctx["sha"], arch=str(ctx["arch"]), img_size=cfg.input_size,
                    norm=enc.norm_kind, transform=describe_transform(t), data_fingerprint=data.fingerprint(),
                    split=split)
        res[split] = cache.get_or_extract(enc, loader, specs, base_key=base, device=ctx["device"],
                                          amp_dtype=C.amp_dtype_for(ctx["device"], cfg), log=ctx["log"])
    return res


def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, T: float = 0.07, chunk: int = 1024, rows: list | None = None) -> dict:
    """DINO weighted kNN (facebookresearch/dino ``eval_knn.knn_classifier``).

    Features (N, D) are L2-normalised here; similarity = cosine; the k nearest train samples vote for
    their class with weight exp(sim / T). k is capped at the train size. Returns top1/top5 (%).
    With ``rows`` (a list), per-sample rows (:func:`common.top5_rows`) are appended, the scores
    being each class's share of the votes.
    """
    tr = F.normalize(train_f.float(), dim=1)
    te = F.normalize(test_f.float(), dim=1)
    k = min(k, len(tr))
    c1 = c5 = 0
    for s in range(0, len(te), chunk):
        sim = te[s:s + chunk] @ tr.T
        d, i = sim.topk(k, dim=1)
        votes = torch.zeros(len(d), num_classes, dtype=d.dtype)
        votes.scatter_add_(1, train_y[i], (d / T).exp())
        a, b = C.topk_correct(votes, test_y[s:s + chunk])
        c1, c5 = c1 + a, c5 + b
        if rows is not None:  # softmax of log(vote share) = vote share
            share = votes / votes.sum(1, keepdim=True)
            rows += C.top5_rows(share.log(), test_y[s:s + chunk], range(s, s + len(votes)))
    n = max(len(te), 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def _knn_metrics(ctx, feats, block: int, rows_for: str | None = None) -> dict:
    kc = ctx["cfg"].get("knn", {})
    out = {}
    for p in POOLINGS:
        tr, ytr = feats["train"][(block, p)]
        va, yva = feats["val"][(block, p)]
        r = knn_classify(tr, ytr, va, yva, ctx["train"].num_classes, kc.get("k", 20), kc.get("temperature", 0.07),
                         rows=ctx["rows"] if p == rows_for else None)
        out[f"knn_{p}_top1"], out[f"knn_{p}_top5"] = r["top1"], r["top5"]
    return out


def _fast_probe(ctx) -> tuple[dict, dict]:
    cfg, enc = ctx["cfg"], ctx["encoder"]
    L = enc.depth
    types = feature_types("fast", L, cfg.fast.get("pools", POOLINGS), cfg.fast.get("layers", LAYER_SETS))
    specs = sorted({s for v in types.values() for s in v})
    feats = _cache_features(ctx, specs)
    n = len(ctx["train"].samples)
    fit_idx, hold_idx = holdout_split(n, cfg.fast.holdout_fraction, cfg.seed)
    heads, scores, history, wall = train_heads(ctx, feats["train"], types, fit_idx, hold_idx, ctx["train"].num_classes)
    best = select_best(scores, _usable(scores))
    val = _gather(feats["val"], {best[0]: types[best[0]]}, None, ctx["device"])
    yv = next(iter(feats["val"].values()))[1].to(ctx["device"])
    vscore = score_heads(heads, val, yv, only=best)[best]
    _head_rows(ctx, heads, val, yv, best)
    blrs = list(cfg.fast.blrs)
    grid = [{"features": t, "blr": blrs[i], "holdout_top1": s["top1"], "holdout_top5": s["top5"],
             "holdout_loss": s["loss"], "diverged": bool(s.get("diverged", False))}
            for (t, i), s in sorted(scores.items(), key=lambda kv: (list(types).index(kv[0][0]), kv[0][1]))]
    choice = {"features": best[0], "blr": blrs[best[1]], "holdout_top1": scores[best]["top1"]}
    metrics = {"top1": vscore["top1"], "top5": vscore["top5"], "holdout_top1": scores[best]["top1"]}
    metrics.update(_knn_metrics(ctx, feats, L - 1))
    ctx["log"].info(f"fast probe: chose {choice} on the train hold-out; val top1 {metrics['top1']:.2f}")
    extra = {"selection_split": f"train holdout ({len(hold_idx)} of {n} train images, seed {cfg.seed})",
             "holdout_indices_sha256": _idx_sha(hold_idx), "grid": grid, "choice": choice,
             "feature_norm": enc.norm_kind, "cache": dict(ctx["cache"].stats), "history": history,
             "epochs_heads": cfg.fast.get("epochs") or cfg.epochs}
    return metrics, extra


@torch.no_grad()
def _head_rows(ctx, heads: MultiHead, feats: dict, y: torch.Tensor, key: tuple[str, int], batch: int = 4096) -> None:
    """Per-sample prediction rows (:func:`common.top5_rows`) of head ``key`` on the val features
    (val order), into ``ctx['rows']``."""
    heads.eval()
    t, i = key
    for s in range(0, len(y), batch):
        out = heads({t: feats[t][s:s + batch].float()})[t][i]
        ctx["rows"] += C.top5_rows(out, y[s:s + batch].cpu(), range(s, s + len(out)))


def _idx_sha(idx: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(idx.cpu().numpy().tobytes()).hexdigest()[:16]


def _blocks_probe(ctx) -> tuple[dict, dict]:
    cfg, enc = ctx["cfg"], ctx["encoder"]
    L = enc.depth
    pools = list(cfg.fast.get("pools", POOLINGS))
    types = feature_types("blocks", L, pools)
    specs = sorted({s for v in types.values() for s in v})
    feats = _cache_features(ctx, specs)
    n = len(ctx["train"].samples)
    fit_idx, hold_idx = holdout_split(n, cfg.fast.holdout_fraction, cfg.seed)
    heads, scores, history, wall = train_heads(ctx, feats["train"], types, fit_idx, hold_idx, ctx["train"].num_classes)
    yv = next(iter(feats["val"].values()))[1].to(ctx["device"])
    blrs = list(cfg.fast.blrs)
    curve = {p: [] for p in pools}
    for b in range(L):
        for p in pools:
            t = f"b{b}_{p}"
            keys = _usable(scores, [(t, i) for i in range(len(blrs))])
            if not keys:
                raise ctx["ckpt"].diverged(f"blocks probe: every head of block {b} ({p}) diverged")
            best = select_best(scores, keys)
            v = score_heads(heads, _gather(feats["val"], {t: types[t]}, None, ctx["device"]), yv, only=best)[best]
            curve[p].append({"block": b, "blr": blrs[best[1]], "holdout_top1": scores[best]["top1"],
                             "top1": v["top1"], "top5": v["top5"], "head": best})
    best_pool, best_block = max(((p, r) for p in pools for r in curve[p]), key=lambda pr: pr[1]["holdout_top1"])
    t_best, i_best = best_block.pop("head")
    for p in pools:
        for r in curve[p]:
            r.pop("head", None)
    _head_rows(ctx, heads, _gather(feats["val"], {t_best: types[t_best]}, None, ctx["device"]), yv, (t_best, i_best))
    out = ctx["out"]
    atomic_write_json({"curve": curve, "selection_split": "train holdout", "depth": L}, out / "blocks.json")
    _plot_curve(curve, out / "blocks.png", ctx["backbone"])
    metrics = {"top1": best_block["top1"], "top5": best_block["top5"]}
    extra = {"selection_split": f"train holdout ({len(hold_idx)} of {n} train images, seed {cfg.seed})",
             "choice": {"pooling": best_pool, **best_block}, "curve": curve, "feature_norm": enc.norm_kind,
             "cache": dict(ctx["cache"].stats), "epochs_heads": cfg.fast.get("epochs") or cfg.epochs}
    return metrics, extra


def _plot_curve(curve: dict, path, title: str) -> None:
    """Val top-1 per block for each pooling, as a PNG written atomically."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for p, rows in curve.items():
        ax.plot([r["block"] + 1 for r in rows], [r["top1"] for r in rows], marker="o", label=p)
    ax.set_xlabel("encoder block")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(str(title)[-60:], fontsize=8)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _knn_probe(ctx) -> tuple[dict, dict]:
    L = ctx["encoder"].depth
    feats = _cache_features(ctx, [(L - 1, p) for p in POOLINGS])
    pool = ctx["cfg"].get("knn", {}).get("pooling", "token")
    m = _knn_metrics(ctx, feats, L - 1, rows_for=pool)
    metrics = {"top1": m[f"knn_{pool}_top1"], "top5": m[f"knn_{pool}_top5"], **m}
    return metrics, {"selection_split": "none", "knn": dict(ctx["cfg"].get("knn", {})),
                     "feature_norm": ctx["encoder"].norm_kind, "cache": dict(ctx["cache"].stats)}


# --------------------------------------------------------------------------------------------------
# entry
# --------------------------------------------------------------------------------------------------
def run_linprobe(args, cfg, task: str = "linprobe") -> dict:
    """Run (or resume) the linear-probe protocol ``cfg.protocol`` in ``args.output_dir``.

    Returns the metrics dict (written to ``metrics.json`` at the end). ``metrics``: ``top1``/``top5``
    (%, val) of the protocol's head (``fast``/``blocks``: the head chosen on the train hold-out), plus
    ``knn_*`` for ``fast``/``knn``.

    Raises:
        UserError: unknown protocol, bad data / checkpoint / config (one line).
    """
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"config protocol={cfg.protocol!r}: expected one of {PROTOCOLS}")
    data_root = resolve_data_root(args.data_root)
    run = C.prepare_run(cfg, args.output_dir, args.resume, task,
                        {"protocol": f"linprobe_{cfg.protocol}", "backbone": args.backbone,
                         "data_root": str(data_root.resolve())})
    if run.finished is not None:
        return run.finished
    layout = run.setup()
    if layout.world_size > 1 and cfg.protocol != "mae":
        raise UserError(f"protocol {cfg.protocol!r} runs on one process (features are cached once); "
                        f"launch it without torchrun")
    device = run.device
    # every input is read before anything is written
    seed_everything(cfg.seed + layout.rank, cfg.get("deterministic", False))
    timer = C.Timer()
    train, val = load_train_val(cfg.data, data_root)
    encoder, report = build_encoder(args.backbone, cfg)
    with run.start():
        log = run.open_log(task)
        out = run.out
        encoder.to(device)
        sha = C.backbone_sha(args.backbone, report)
        log.info(report.summary() if hasattr(report, "summary") else str(report))
        cache_dir = cfg.fast.get("cache_dir") if cfg.get("fast") else None
        ctx = dict(cfg=cfg, device=device, log=log, task=task, train=train, val=val, encoder=encoder, sha=sha,
                   arch=getattr(report, "arch", cfg.get("arch")), out=out, run=run, ckpt=run.checkpoints(keep=0),
                   cache=FeatureCache(cache_dir), backbone=args.backbone, rows=[])
        fn = {"mae": _mae_probe, "fast": _fast_probe, "blocks": _blocks_probe, "knn": _knn_probe}[cfg.protocol]
        metrics, extra = fn(ctx)
        tb = run.tensorboard()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(f"{task}/final_{k}", v, 0)
        prev = extra.pop("wall_time", None)
        wall = max(timer.elapsed, prev or 0.0)
        epochs = cfg.epochs if cfg.protocol == "mae" else (0 if cfg.protocol == "knn" else extra.get("epochs_heads", cfg.epochs))
        pred = C.write_predictions(run, ctx["rows"], val, data_root)
        extra.update(num_classes=train.num_classes, dataset=dict(cfg.data), predictions=pred,
                     **C.data_provenance(cfg, data_root, train, val))
        return C.finish_run(run, task=task, protocol=f"linprobe_{cfg.protocol}", metrics=metrics, cfg=cfg,
                            backbone=args.backbone, sha=sha, report=report, epochs=epochs, wall_time_s=wall,
                            extra=extra)
