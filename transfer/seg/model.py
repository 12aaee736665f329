"""UperNet with a plain-ViT backbone (mmsegmentation's MAE recipe), written natively in torch/timm.

Protocol source: mmsegmentation 1.2.2
``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` (+ ``_base_/models/upernet_mae.py``):

* backbone ``mmseg/models/backbones/mae.py`` (``MAE(BEiT)``): ViT, cls token kept in the sequence,
  features = outputs of blocks ``out_indices`` without the cls token, NO final norm; optional
  BEiT-style relative position bias (zero init, ``MAEAttention``) and layer scale (``init_values``)
  — :class:`ViTBackbone`, switch ``rel_pos_bias`` / ``layer_scale_init``;
* neck ``mmseg/models/necks/featurepyramid.py`` (``Feature2Pyramid``) — :class:`Feature2Pyramid`;
* decode head ``mmseg/models/decode_heads/uper_head.py`` + ``psp_head.py`` (``PPM``) — :class:`UPerHead`;
* auxiliary head ``mmseg/models/decode_heads/fcn_head.py`` — :class:`FCNHead`;
* segmentor ``mmseg/models/segmentors/encoder_decoder.py`` (loss at label resolution, ``slide`` /
  ``whole`` inference) and ``mmseg/models/losses/cross_entropy_loss.py`` (mean over ALL pixels,
  ``avg_non_ignore=False``) — :class:`UperNet`.

Module / parameter names of the neck and heads are mmseg's (``lateral_convs.0.conv.weight``,
``lateral_convs.0.bn.*`` …); the backbone uses timm's ViT names so MAE / CrossMAE checkpoints load as
is (the renaming to mmseg's ``MAE`` backbone is in ``tests/test_ade20k_parity.py``).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models.beit import gen_relative_position_index
from timm.models.vision_transformer import Block, init_weights_vit_timm

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------------
class RelPosAttention(Attention):
    """timm ``Attention`` plus a BEiT relative position bias table (mmseg ``MAEAttention``).

    The table has ``(2·Wh−1)(2·Ww−1) + 3`` rows (the 3 extra rows are cls→token, token→cls and
    cls→cls) and ``num_heads`` columns, zero-initialised as in mmseg's ``MAEAttention.init_weights``.
    :meth:`bias` returns the additive attention bias ``(1, heads, 1+h·w, 1+h·w)`` for a token grid
    ``h × w`` no larger than the window (smaller grids index the same table).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, window_size: tuple[int, int] = (32, 32), **kw):
        super().__init__(dim, num_heads=num_heads, **kw)
        self.window_size = tuple(window_size)
        n = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads))
        self._index_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _index(self, grid: tuple[int, int], device) -> torch.Tensor:
        if grid == self.window_size:
            idx = gen_relative_position_index(self.window_size)
        else:
            if grid[0] > self.window_size[0] or grid[1] > self.window_size[1]:
                raise ValueError(f"token grid {grid} larger than the relative-position window "
                                 f"{self.window_size}")
            # relative offsets of the smaller grid, indexed into the full window's table
            wh, ww = self.window_size
            ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
            coords = torch.stack([ys.flatten(), xs.flatten()])
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
            body = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
            n_rel = (2 * wh - 1) * (2 * ww - 1)
            m = grid[0] * grid[1] + 1
            idx = torch.zeros(m, m, dtype=torch.long)
            idx[1:, 1:] = body
            idx[0, 0:] = n_rel
            idx[0:, 0] = n_rel + 1
            idx[0, 0] = n_rel + 2
        return idx.to(device)

    def bias(self, grid: tuple[int, int]) -> torch.Tensor:
        key = tuple(grid)
        idx = self._index_cache.get(key)
        if idx is None or idx.device != self.relative_position_bias_table.device:
            idx = self._index_cache[key] = self._index(key, self.relative_position_bias_table.device)
        m = idx.shape[0]
        b = self.relative_position_bias_table[idx.view(-1)].view(m, m, -1)
        return b.permute(2, 0, 1).unsqueeze(0).contiguous()


class ViTBackbone(nn.Module):
    """Plain ViT returning multi-level feature maps (mmseg ``MAE`` backbone, ``final_norm=False``).

    Parameter names are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``) so MAE / CrossMAE encoder
    weights load unchanged. With ``rel_pos_bias`` each block adds ``attn.relative_position_bias_table``
    (zero init); with ``layer_scale_init`` each block adds ``ls1.gamma`` / ``ls2.gamma`` (init to the
    value; mmseg's MAE config uses 1.0). Neither is in MAE / CrossMAE checkpoints.

    Args:
        img_size: training crop (pixels); sets the ``pos_embed`` grid (512/16 = 32) and the
            relative-position window.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: ViT size.
        out_indices: 0-based block indices whose outputs are returned (B: 3, 5, 7, 11).
        drop_path_rate: stochastic depth, linearly increasing over the blocks (``torch.linspace``).

    Input ``(B, 3, H, W)`` normalised image; H and W need not be multiples of ``patch_size`` (the
    patch grid is ``floor(H/16) × floor(W/16)``, as mmseg's ``PatchEmbed(padding=0)``); output tuple of ``(B, embed_dim, H/16, W/16)`` maps. When the
    grid differs from the ``pos_embed`` grid, ``pos_embed`` is bicubically resampled on the fly
    (mmseg would fail; this only happens for inputs smaller than the crop).
    """

    def __init__(self, img_size: int = 512, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, out_indices: Sequence[int] = (3, 5, 7, 11),
                 drop_path_rate: float = 0.1, rel_pos_bias: bool = False,
                 layer_scale_init: float | None = None):
        super().__init__()
        if max(out_indices) >= depth or min(out_indices) < 0:
            raise ValueError(f"out_indices {list(out_indices)} outside 0..{depth - 1}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.out_indices = tuple(int(i) for i in out_indices)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3,
                                      embed_dim=embed_dim, strict_img_size=False, output_fmt="NHWC")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.rel_pos_bias = bool(rel_pos_bias)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=layer_scale_init,
                  drop_path=dpr[i], norm_layer=norm)
            for i in range(depth)])
        if self.rel_pos_bias:
            for blk in self.blocks:
                blk.attn = RelPosAttention(embed_dim, num_heads, qkv_bias=True, window_size=self.grid)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights_vit_timm)  # trunc_normal(0.02) Linear weights, zero biases (timm / mmseg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        # the conv floors sizes that are not multiples of the patch (mmseg PatchEmbed, padding=0)
        x = self.patch_embed.proj(x)  # (B, D, h, w)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if (h, w) != self.grid:
            pos = resample_abs_pos_embed(pos, [h, w], old_size=list(self.grid), num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + pos
        outs = []
        for i, blk in enumerate(self.blocks):
            mask = blk.attn.bias((h, w)).to(x.dtype) if self.rel_pos_bias else None
            x = blk(x, attn_mask=mask)
            if i in self.out_indices:
                outs.append(x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w))
        return tuple(outs)


# --------------------------------------------------------------------------------------------------
# neck and heads
# --------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule`` with ``norm_cfg=BN``, ``act_cfg=ReLU``: conv (no bias, since a norm
    follows) → BatchNorm2d (eps 1e-5, momentum 0.1) → ReLU. Init as mmcv: Kaiming normal
    (fan_out, relu), BN weight 1 / bias 0. Names ``conv``, ``bn`` = mmcv's."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class Feature2Pyramid(nn.Module):
    """ViT single-scale maps → pyramid (mmseg ``necks/featurepyramid.py``).

    ``rescales`` (4, 2, 1, 0.5): level 0 ConvT(2,2)-BN-GELU-ConvT(2,2), level 1 ConvT(2,2),
    level 2 identity, level 3 MaxPool(2). Input: 4 maps ``(B, D, h, w)``; output
    ``(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)``. BN becomes SyncBN under DDP.
    """

    def __init__(self, embed_dim: int, rescales: Sequence[float] = (4, 2, 1, 0.5)):
        super().__init__()
        if list(rescales) != [4, 2, 1, 0.5]:
            raise ValueError(f"neck rescales {list(rescales)}: only [4, 2, 1, 0.5] is implemented")
        self.rescales = list(rescales)
        d = embed_dim
        self.upsample_4x = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.BatchNorm2d(d), nn.GELU(),
                                         nn.ConvTranspose2d(d, d, 2, 2))
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(2, 2)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != 4:
            raise ValueError(f"Feature2Pyramid expects 4 maps, got {len(inputs)}")
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return tuple(op(x) for op, x in zip(ops, inputs))


class _ClsSeg(nn.Module):
    """mmseg ``BaseDecodeHead.cls_seg``: Dropout2d(p) → 1×1 conv ``conv_seg`` (init N(0, 0.01), bias 0)."""

    def _init_cls(self, channels: int, num_classes: int, dropout: float) -> None:
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)


class UPerHead(_ClsSeg):
    """UPerNet head (mmseg ``decode_heads/uper_head.py``, PPM from ``psp_head.py``).

    PPM on the last level (adaptive avg-pool to each of ``pool_scales``, ConvBNReLU 1×1, bilinear
    upsampling, ``align_corners=False``) → concat with the input → 3×3 ``bottleneck``; 1×1 laterals
    on the other levels; top-down sum with bilinear upsampling; 3×3 ``fpn_convs``; all levels
    upsampled to level 0, concatenated, 3×3 ``fpn_bottleneck``; ``cls_seg``.

    Input: 4 maps ``(B, C_i, H_i, W_i)`` (level 0 the largest); output logits
    ``(B, num_classes, H_0, W_0)``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1))
            for s in self.pool_scales])
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, 1)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3, 1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, 1)
        self._init_cls(channels, num_classes, dropout)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [F.interpolate(m(x), size=x.shape[2:], mode="bilinear", align_corners=False)
                      for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_ClsSeg):
    """Auxiliary FCN head (mmseg ``decode_heads/fcn_head.py``) as configured in ``upernet_mae.py``:
    ``num_convs`` 3×3 ConvBNReLU (1), no input concat, ``cls_seg``. Input: the pyramid tuple;
    uses level ``in_index`` (2). Output ``(B, num_classes, H_i, W_i)``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3, 1)
                                     for i in range(num_convs)])
        self._init_cls(channels, num_classes, dropout)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.convs(inputs[self.in_index]))


# --------------------------------------------------------------------------------------------------
# segmentor
# --------------------------------------------------------------------------------------------------
def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """mmseg ``CrossEntropyLoss`` (``avg_non_ignore=False``): logits ``(B, K, h, w)`` are resized
    bilinearly to the label size ``(B, H, W)`` first; per-pixel CE summed over non-ignored pixels and
    divided by ALL ``B·H·W`` pixels (ignored ones included) — mmseg's default averaging."""
    if logits.shape[2:] != label.shape[1:]:
        logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), label.long(), ignore_index=ignore_index, reduction="sum")
    return loss / label.numel()


class UperNet(nn.Module):
    """ViT + Feature2Pyramid + UPerHead + auxiliary FCNHead (mmseg ``EncoderDecoder``).

    Args: see the config's ``model`` dict (``configs/ade20k/paper_vit_base.py``).

    ``forward(img)`` → ``(logits (B, K, H/4, W/4), aux_logits (B, K, H/16, W/16))`` (pyramid levels 0, 2).
    :meth:`loss` → dict ``loss_ce``, ``aux.loss_ce`` (weighted), ``loss`` (the sum).
    :meth:`inference` → logits ``(B, K, H, W)`` at the input resolution (``whole`` or ``slide``).
    """

    def __init__(self, num_classes: int, img_size: int = 512, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 out_indices: Sequence[int] = (3, 5, 7, 11), drop_path_rate: float = 0.1,
                 rel_pos_bias: bool = False, layer_scale_init: float | None = None,
                 rescales: Sequence[float] = (4, 2, 1, 0.5), channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux_channels: int = 256, aux_in_index: int = 2, aux_num_convs: int = 1,
                 aux_loss_weight: float = 0.4, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_loss_weight = aux_loss_weight
        self.backbone = ViTBackbone(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, out_indices,
                                    drop_path_rate, rel_pos_bias, layer_scale_init)
        self.neck = Feature2Pyramid(embed_dim, rescales)
        self.decode_head = UPerHead([embed_dim] * 4, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(embed_dim, aux_channels, num_classes, aux_in_index, aux_num_convs, dropout)

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None, with_aux: bool = True):
        """With ``label`` ``(B, H, W)``: the loss dict (see :meth:`loss`); without: ``(logits, aux_logits
        or None)`` at 1/4 and 1/16 resolution. (One entry point so that DDP sees the training forward.)"""
        feats = self.neck(self.backbone(img))
        out = self.decode_head(feats)
        aux = self.auxiliary_head(feats) if (with_aux or label is not None) else None
        if label is None:
            return out, aux
        l_main = seg_cross_entropy(out, label, self.ignore_index)
        l_aux = self.aux_loss_weight * seg_cross_entropy(aux, label, self.ignore_index)
        return {"loss_ce": l_main, "aux.loss_ce": l_aux, "loss": l_main + l_aux}

    def loss(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """img ``(B, 3, H, W)`` normalised, label ``(B, H, W)`` int with ``ignore_index`` →
        ``{'loss_ce', 'aux.loss_ce' (already × aux_loss_weight), 'loss' (their sum)}``."""
        return self(img, label)

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Decode-head logits resized (bilinear) to the input size: ``(B, K, H, W)``."""
        out, _ = self(img, with_aux=False)
        return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def inference(self, img: torch.Tensor, mode: str = "slide", crop_size: tuple[int, int] = (512, 512),
                  stride: tuple[int, int] = (341, 341)) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for a normalised image batch ``(B, 3, H, W)``.

        ``slide`` (mmseg ``EncoderDecoder.slide_inference``): windows of ``crop_size`` every
        ``stride`` (the last one aligned to the border; a window larger than the image is clipped to
        it, no padding), logits of overlapping windows averaged. ``whole``: one pass.
        """
        if mode == "whole":
            return self.encode_decode(img)
        if mode != "slide":
            raise ValueError(f"inference mode {mode!r}: expected 'slide' or 'whole'")
        hs, ws = stride
        hc, wc = crop_size
        b, _, h, w = img.shape
        h_grids = max(h - hc + hs - 1, 0) // hs + 1
        w_grids = max(w - wc + ws - 1, 0) // ws + 1
        preds = img.new_zeros((b, self.num_classes, h, w), dtype=torch.float32)
        count = img.new_zeros((b, 1, h, w), dtype=torch.float32)
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2 = min(hi * hs + hc, h)
                x2 = min(wi * ws + wc, w)
                y1 = max(y2 - hc, 0)
                x1 = max(x2 - wc, 0)
                preds[:, :, y1:y2, x1:x2] += self.encode_decode(img[:, :, y1:y2, x1:x2]).float()
                count[:, :, y1:y2, x1:x2] += 1
        return preds / count

