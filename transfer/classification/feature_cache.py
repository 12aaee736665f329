"""Frozen-encoder features: definitions (pooling, norm) and an on-disk cache.

Feature of encoder block ``b`` (0-based; block outputs ``x_b`` of shape (B, 1+N, D), cls first):

* ``token``: ``norm(x_b)[:, 0]`` — the cls token through the encoder's final LayerNorm (MAE
  ``models_vit`` with ``global_pool=False``; DINO applies the final norm to intermediate blocks the same
  way). CrossMAE checkpoints have NO final norm: ``norm`` is then a parameter-free LayerNorm
  (eps 1e-6), exactly what the reference code computes when it loads such a checkpoint non-strictly
  into a ViT whose ``norm`` keeps its init (weight 1, bias 0) — here explicit, never a silent miss.
* ``avg``: ``LayerNorm_noaffine(mean(x_b[:, 1:], 1))`` — mean of the patch tokens then a parameter-free
  LayerNorm (MAE ``global_pool=True``: a fresh, frozen ``fc_norm`` during linear probing).

Cache (``FeatureCache``): one file per (checkpoint SHA-256, arch, image size, block, pooling, norm,
transform description, dataset split fingerprint); the file name is the SHA-256 of that key and the
key is stored inside and compared on load, so a change of any component is a miss (invalidation),
and a file whose stored key differs is recomputed. Features are stored as float16 (N, D) with the
labels (N,) int64.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossmae.utils import UserError, atomic_save, safe_torch_load

POOLINGS = ("token", "avg")
CACHE_ENV = "CROSSMAE_FEATURE_CACHE"
CACHE_VERSION = 1


class FeatureEncoder(nn.Module):
    """Frozen timm ViT returning the pooled features of chosen blocks.

    Args:
        vit: a timm ``VisionTransformer`` (cls token, ``global_pool`` token, any ``num_classes``).
        has_final_norm: whether the checkpoint had ``norm.*`` (``LoadReport.has_final_norm``); when
            False the final norm is replaced by a parameter-free LayerNorm (see module doc).
    """

    def __init__(self, vit: nn.Module, has_final_norm: bool):
        super().__init__()
        self.vit = vit
        self.depth = len(vit.blocks)
        self.dim = vit.embed_dim
        self.has_final_norm = bool(has_final_norm)
        if not self.has_final_norm or isinstance(vit.norm, nn.Identity):
            self.vit.norm = nn.LayerNorm(self.dim, eps=1e-6, elementwise_affine=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def norm_kind(self) -> str:
        return "final_norm" if self.has_final_norm else "paramfree_ln"

    def block_outputs(self, x: torch.Tensor, blocks: Iterable[int]) -> dict[int, torch.Tensor]:
        """Outputs (B, 1+N, D) of the requested blocks for images ``x`` (B, 3, H, W)."""
        want = set(blocks)
        v = self.vit
        h = v.patch_embed(x)
        h = v._pos_embed(h)
        h = v.patch_drop(h)
        h = v.norm_pre(h)
        out = {}
        last = max(want)
        for i, blk in enumerate(v.blocks):
            h = blk(h)
            if i in want:
                out[i] = h
            if i >= last:
                break
        return out

    def pool(self, h: torch.Tensor, pooling: str) -> torch.Tensor:
        """(B, 1+N, D) block output → (B, D) feature for ``pooling`` in :data:`POOLINGS`."""
        if pooling == "token":
            return self.vit.norm(h[:, 0])
        if pooling == "avg":
            return F.layer_norm(h[:, 1:].mean(1), (self.dim,), eps=1e-6)
        raise UserError(f"pooling {pooling!r}: expected one of {POOLINGS}")

    @torch.no_grad()
    def features(self, x: torch.Tensor, specs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        """``{(block, pooling): (B, D)}`` for every requested spec, from one forward pass."""
        hs = self.block_outputs(x, [b for b, _ in specs])
        return {(b, p): self.pool(hs[b], p) for b, p in specs}

    def forward(self, x: torch.Tensor, block: int = -1, pooling: str = "token") -> torch.Tensor:
        b = block % self.depth
        return self.features(x, [(b, pooling)])[(b, pooling)]


def default_cache_dir() -> Path:
    """``$CROSSMAE_FEATURE_CACHE`` or ``~/.cache/crossmae/features``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "crossmae" / "features")


class FeatureCache:
    """On-disk cache of pooled features (see module doc for the key).

    ``stats`` counts ``hits`` / ``misses`` (per (block, pooling) entry) for logs and tests.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = {"hits": 0, "misses": 0}

    @staticmethod
    def make_key(*, checkpoint_sha256: str, arch: str, img_size: int, block: int, pooling: str, norm: str,
                 transform: str, data_fingerprint: str, split: str) -> dict:
        """The dict that identifies one cached feature matrix."""
        return {"version": CACHE_VERSION, "checkpoint_sha256": checkpoint_sha256, "arch": arch,
                "img_size": int(img_size), "block": int(block), "pooling": pooling, "norm": norm,
                "transform": transform, "data_fingerprint": data_fingerprint, "split": split}

    def path_for(self, key: dict) -> Path:
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.dir / f"feat-{key['split']}-b{key['block']}-{key['pooling']}-{h}.pt"

    def load(self, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features (N, D) float16, labels (N,))`` or ``None`` on a miss / stale / unreadable file."""
        p = self.path_for(key)
        if not p.is_file():
            return None
        try:
            obj = safe_torch_load(p)
        except UserError:
            return None
        if not isinstance(obj, dict) or obj.get("key") != key:
            return None
        f, y = obj.get("features"), obj.get("labels")
        # an untrusted file: (N, D) floating features and (N,) integer labels, else a miss (re-extracted)
        if not (isinstance(f, torch.Tensor) and isinstance(y, torch.Tensor) and f.dim() == 2 and y.dim() == 1
                and f.shape[0] == y.shape[0] and f.is_floating_point() and not y.is_floating_point()
                and not y.dtype == torch.bool):
            return None
        return f.half(), y.long()

    def save(self, key: dict, feats: torch.Tensor, labels: torch.Tensor) -> Path:
        return atomic_save({"key": key, "features": feats.half().cpu(), "labels": labels.cpu()}, self.path_for(key))

    def get_or_extract(self, encoder: FeatureEncoder, loader, specs: Sequence[tuple[int, str]], *,
                       base_key: dict, device: torch.device, amp_dtype=None, log=None) -> dict:
        """Features for every ``(block, pooling)`` in ``specs`` over ``loader`` (fixed order, eval
        transform): cached entries are read, all missing ones are computed in ONE pass over the data.

        Args:
            base_key: :meth:`make_key` arguments except ``block`` and ``pooling``.
        Returns:
            ``{(block, pooling): (features (N, D) float16, labels (N,) int64)}`` (float16 as stored;
            cast per batch when training).
        """
        res, missing = {}, []
        for b, p in specs:
            got = self.load(self.make_key(block=b, pooling=p, **base_key))
            if got is None:
                missing.append((b, p))
            else:
                res[(b, p)] = got
        self.stats["hits"] += len(res)
        self.stats["misses"] += len(missing)
        if missing:
            if log:
                log.info(f"feature cache: extracting {len(missing)} entries ({base_key['split']}), {len(res)} hits")
            encoder.to(device).eval()
            acc = {s: [] for s in missing}
            labels = []
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    f = encoder.features(x, missing)
                for s in missing:
                    acc[s].append(f[s].float().cpu())
                labels.append(y.cpu())
            y_all = torch.cat(labels).long()
            for s in missing:
                feats = torch.cat(acc[s])
                self.save(self.make_key(block=s[0], pooling=s[1], **base_key), feats, y_all)
                res[s] = (feats.half(), y_all)  # the precision of a later cache hit
        return res
