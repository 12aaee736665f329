"""ViTDet backbone: a plain ViT with window attention + the simple feature pyramid.

Protocol source: detectron2 ``detectron2/modeling/backbone/vit.py`` (``ViT``, ``SimpleFeaturePyramid``,
``get_vit_lr_decay_rate``), ``detectron2/modeling/backbone/utils.py`` (window partition, decomposed
relative positions, ``get_abs_pos``) and ``configs/common/models/mask_rcnn_vitdet.py`` (the B/L/H
settings). Parameter names follow timm/MAE (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2,mlp.fc1,mlp.fc2}``), so a
MAE / CrossMAE encoder state dict maps onto it one to one (no suffix matching, see REFERENCE §7).

The attention module is timm's ``vision_transformer_sam.Attention`` (decomposed rel-pos bias added
to the SDPA logits, exactly detectron2's ``add_decomposed_rel_pos``). The block is our own because
detectron2 applies drop path *after* window un-partitioning (one draw per image), whereas timm's SAM
block draws per window.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer_sam import Attention, window_partition, window_unpartition


class LayerNorm2d(nn.Module):
    """Channel LayerNorm for NCHW maps (detectron2 ``layers/batch_norm.py: LayerNorm``, norm "LN").

    Normalises over C at every pixel, eps 1e-6, affine. Deliberately *not* a subclass of
    ``nn.LayerNorm``: detectron2's optimizer treats only ``torch.nn`` norm types as norms, so the
    feature pyramid / head LN parameters get the full weight decay there (and here).

    Shapes: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same maths as detectron2's mean/var formulation (biased variance), via the fused kernel
        # (contiguous: a channels-last view would propagate into the following convs and give DDP
        # gradients whose strides differ from its buckets)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()


class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch). (N, 3, H, W) -> (N, H/p, W/p, D) channels-last."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ViTDetBlock(nn.Module):
    """Pre-norm transformer block with optional window attention (detectron2 ``vit.Block``).

    Window blocks partition the (H, W) token grid into ``window_size``² windows (zero padding at the
    bottom/right when H or W is not a multiple), attend inside each, and un-partition. Relative
    position tables ``attn.rel_pos_{h,w}`` have ``2*S-1`` rows of ``head_dim`` (S = window size or
    the global grid size), zero-initialised. Drop path is applied per image after un-partitioning.

    Shapes: (N, H, W, D) -> (N, H, W, D).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 norm_layer, use_rel_pos: bool, window_size: int, input_size: tuple[int, int]):
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              input_size=input_size if window_size == 0 else (window_size, window_size))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, (H, W), pad_hw)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_abs_pos(pos_embed: torch.Tensor, hw: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    """detectron2 ``utils.get_abs_pos``: drop the cls row, bicubically interpolate the square grid to
    ``hw`` (align_corners=False) when it differs.

    Args:
        pos_embed: (1, [1+]G*G, D).
        hw: target token grid (h, w).
    Returns:
        (1, h, w, D).
    """
    from crossmae.backbone import resize_pos_embed
    prefix = 1 if has_cls else 0
    out = resize_pos_embed(pos_embed, tuple(hw), num_prefix=prefix)[:, prefix:]
    return out.reshape(1, hw[0], hw[1], -1)


class ViTDetViT(nn.Module):
    """Plain ViT backbone of ViTDet (detectron2 ``modeling/backbone/vit.py: ViT``).

    - no cls token, no final norm, output = last block's map (``last_feat``, stride = patch);
    - ``pos_embed`` is stored at the *pretraining* grid with its cls row, shape
      (1, 1 + (pretrain_img_size/patch)², D), and bicubically resized to the input grid at every
      forward, as detectron2 does (so the 14×14 table of a 224 checkpoint is what gets fine-tuned);
    - window attention (``window_size``) in every block except ``global_blocks``; decomposed rel-pos
      tables in every block (zero init); drop path linearly increasing 0 → ``drop_path_rate``.

    Args:
        img_size: training input side (the global blocks' rel-pos tables are sized for img/patch).
        window_size: window side in tokens (14 in the paper recipe).
        global_blocks: indices of global-attention blocks (B: 2,5,8,11; L: 5,11,17,23; H: 7,15,23,31).
    Shapes: (N, 3, H, W) float -> {"last_feat": (N, D, H/p, W/p)}.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.1, window_size: int = 14, global_blocks: Sequence[int] = (2, 5, 8, 11),
                 use_rel_pos: bool = True, pretrain_img_size: int = 224):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.global_blocks = tuple(int(i) for i in global_blocks)
        if any(i < 0 or i >= depth for i in self.global_blocks):
            raise ValueError(f"global_blocks {self.global_blocks} out of range for depth {depth}")
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n_pre = (pretrain_img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_pre, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        grid = (img_size // patch_size, img_size // patch_size)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            ViTDetBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer, use_rel_pos,
                        0 if i in self.global_blocks else window_size, grid)
            for i in range(depth)])
        self.apply(_init_weights)

    @property
    def window_block_indexes(self) -> list[int]:
        """Indices of window-attention blocks (detectron2's ``window_block_indexes``)."""
        return [i for i, b in enumerate(self.blocks) if b.window_size > 0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        x = x + resize_abs_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            x = blk(x)
        return {"last_feat": x.permute(0, 3, 1, 2)}


def _init_weights(m: nn.Module) -> None:
    # detectron2 ViT._init_weights: trunc_normal(0.02) Linear, zero bias; LayerNorm 1/0.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _c2_msra_fill(m: nn.Module) -> None:
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class ConvLN(nn.Sequential):
    """Conv2d (no bias) + LayerNorm2d, detectron2 ``Conv2d(..., bias=False, norm=LN)``.

    ``msra_init``: c2_msra_fill (the RoI heads); otherwise PyTorch's default init (the simple
    feature pyramid, which detectron2 leaves at the default)."""

    def __init__(self, cin: int, cout: int, k: int, msra_init: bool = False):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout))
        if msra_init:
            _c2_msra_fill(self[0])


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid (detectron2 ``vit.py: SimpleFeaturePyramid``, norm "LN").

    From the last map (stride p=16): scale 4 = ConvT(2,2)-LN-GELU-ConvT(2,2); 2 = ConvT(2,2);
    1 = identity; 0.5 = MaxPool(2); each followed by 1×1 conv-LN and 3×3 conv-LN to
    ``out_channels``; ``p6`` = max-pool(k=1, s=2) of the coarsest level (``LastLevelMaxPool``).
    Inputs are zero-padded to ``square_pad`` × ``square_pad`` by the detector before the backbone.

    Attributes ``net`` (the ViT) and ``simfp_{2..5}`` reproduce detectron2's parameter names, which
    the layer-wise lr decay rule relies on.
    Shapes: (N, 3, S, S) -> {"p2": (N, C, S/4, S/4), …, "p6": (N, C, S/64, S/64)}.
    """

    def __init__(self, net: ViTDetViT, out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), square_pad: int = 1024):
        super().__init__()
        self.net = net
        self.square_pad = square_pad
        dim = net.embed_dim
        self.out_channels = out_channels
        strides = [int(net.patch_size / s) for s in scale_factors]
        self.stage_names = []
        for scale, stride in zip(scale_factors, strides):
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)]
                c = dim // 4
            elif scale == 2.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
            elif scale == 1.0:
                layers, c = [], dim
            elif scale == 0.5:
                layers, c = [nn.MaxPool2d(2, 2)], dim
            else:
                raise ValueError(f"scale_factor={scale} is not supported")
            layers += [ConvLN(c, out_channels, 1), ConvLN(out_channels, out_channels, 3)]
            name = f"simfp_{int(math.log2(stride))}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
        self.level_names = [f"p{int(math.log2(s))}" for s in strides] + [f"p{int(math.log2(strides[-1])) + 1}"]
        self.strides = strides + [strides[-1] * 2]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.net(x)["last_feat"]
        outs = [getattr(self, n)(feat) for n in self.stage_names]
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self.level_names, outs))


# --------------------------------------------------------------------------------------------------
# loading pretrained encoders
# --------------------------------------------------------------------------------------------------
#: Keys of the ViTDet ViT that no MAE / CrossMAE checkpoint has: the zero-initialised rel-pos tables.
REL_POS_MISSING = (r"blocks\.\d+\.attn\.rel_pos_[hw]",)


def encoder_key_map(name: str) -> str | None:
    """Map a timm-named encoder key to the ViTDet ViT (``net``) name, or None to drop it.

    Dropped: ``cls_token`` (ViTDet has none), ``norm.*`` (no final norm; MAE checkpoints have it,
    CrossMAE's do not), ``fc_norm.*`` / ``head.*`` (classifier of fine-tuned checkpoints).
    """
    if name == "cls_token" or re.match(r"(norm|fc_norm|head)\.", name):
        return None
    return name


def load_pretrained_backbone(net: ViTDetViT, path: str, pretrain_img_size: int = 224, arch: str | None = None):
    """Load a MAE / CrossMAE / timm encoder checkpoint into ``net`` through the core backbone API.

    ``crossmae.load_encoder_state_dict(path, img_size=pretrain_img_size)`` reads the checkpoint and
    resizes its ``pos_embed`` to the pretraining grid of ``net`` (so a 448-px checkpoint's 28×28
    table becomes 14×14 instead of being skipped, REFERENCE §7); ``crossmae.backbone.load_into`` then
    loads it with ``allowed_missing`` = the rel-pos tables only. Every other missing key or any shape
    mismatch raises ``BackboneLoadError`` (a ``UserError``).

    ``arch`` (e.g. ``vit_base_patch16``) makes a checkpoint of another size fail with a clear error.
    When the net's patch size differs from the checkpoint's (ViTDet-H: MAE ViT-H/14 at patch 16, as
    detectron2's p14→p16-converted checkpoint), the patch-embedding kernel is resampled and the
    report says so (``patch_embed_resized``).

    Returns:
        the ``LoadReport`` (loaded / missing / unexpected / ignored key lists).
    """
    from crossmae import load_encoder_state_dict
    from crossmae.backbone import load_into

    sd, report = load_encoder_state_dict(path, arch=arch, img_size=pretrain_img_size, patch_size=net.patch_size)
    return load_into(net, sd, report, key_map=encoder_key_map, allowed_missing=REL_POS_MISSING)
