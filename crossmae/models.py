"""MAE and CrossMAE pretraining models.

State dicts are key-for-key and shape-for-shape equal to the official layouts:
``facebookresearch/mae`` ``models_mae.py`` (MAE) and ``TonyLianLong/CrossMAE`` ``models_cross.py``
(CrossMAE), so checkpoints move both ways. Encoder keys are timm's
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``) so the encoder loads into ``timm.models.vision_transformer.VisionTransformer``.

Masking semantics (official ``random_masking(x, mask_ratio p, kept_mask_ratio γ)``): per sample,
shuffle the L patches by ``argsort(noise)``, noise ~ U[0,1) of shape (N, L); the first
``int(L·(1−p))`` shuffled patches are visible, the next ``int(L·(p−γ))`` are masked and never
predicted, the remaining ones are predicted (mask = 1). For ViT-B/16 at 224 px, p = 0.75, γ = 0.25:
49 visible, 98 dropped, 49 predicted. MAE predicts every masked patch (γ = p).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp

from .attention import ATTN_IMPLS, CrossAttention, SelfAttention

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """Encoder and default decoder sizes of one ViT size (CrossMAE paper Table 11 / official configs)."""
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_num_heads: int
    mae_decoder_depth: int = 8
    crossmae_decoder_depth: int = 12


#: ViT sizes. ``vit_tiny_patch16`` is the suite's test size (not timm's ViT-Ti).
ARCHS: dict[str, Arch] = {
    "vit_tiny_patch16": Arch(16, 64, 4, 4, 64, 4, 2, 2),
    "vit_small_patch16": Arch(16, 384, 12, 6, 256, 8),
    "vit_base_patch16": Arch(16, 768, 12, 12, 512, 16),
    "vit_large_patch16": Arch(16, 1024, 24, 16, 512, 16),
    "vit_huge_patch14": Arch(14, 1280, 32, 16, 512, 16),
}

#: timm model names of the same encoders (for export / timm loading).
TIMM_NAMES = {
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


def get_arch(name: str) -> Arch:
    """The :class:`Arch` of ``name`` (``vit_base_patch16`` …). Raises ``ValueError`` if unknown."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    return ARCHS[name]


# --------------------------------------------------------------------------------------------------
# position embeddings
# --------------------------------------------------------------------------------------------------
def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions → (M, dim) ``[sin(pos·ω), cos(pos·ω)]``, ω_i = 10000^(−i/(dim/2)) (MAE)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, as MAE's ``util/pos_embed.get_2d_sincos_pos_embed``.

    Returns:
        (1 + H·W, dim) float32 with a zero cls row first when ``cls_token``, else (H·W, dim).
        Row order is row-major over the patch grid; the first half of the channels encodes the
        column (x) coordinate and the second half the row (y) coordinate, exactly like MAE's
        ``np.meshgrid(grid_w, grid_h)`` convention.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(dim // 2, xs), sincos_pos_embed_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block with timm / MAE key names (``norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2``). Input / output (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttentionBlock(nn.Module):
    """CrossMAE decoder block: ``x = x + cross_attn(norm1(x), y); x = x + mlp(norm2(x))``.

    With ``self_attn=True`` (the Table 3a ablation) a self-attention among the queries comes first:
    ``x = x + self_attn(norm0(x))``. Keys as the official ``CrossAttentionBlock``.

    Input: x (B, Nq, dec) queries, y (B, Nk, enc) encoder features. Output (B, Nq, dec).
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, self_attn: bool = False, attn_impl: str = "sdpa"):
        super().__init__()
        self.has_self_attn = self_attn
        if self_attn:
            self.norm0 = LayerNorm(decoder_dim)
            self.self_attn = SelfAttention(decoder_dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.norm1 = LayerNorm(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads, qkv_bias=qkv_bias,
                                         attn_impl=attn_impl)
        self.norm2 = LayerNorm(decoder_dim)
        self.mlp = Mlp(decoder_dim, int(decoder_dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, key ``proj`` as timm. (B, 3, H, W) → (B, H/p·W/p, D).

    Raises:
        ValueError: the input size differs from the model's ``img_size``.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------
@dataclass
class Masking:
    """Index sets of one masking draw (all (N, ·) int64, positions in 0..L−1).

    Attributes:
        ids_keep: (N, Lv) visible patches, in shuffle order (as the official code feeds the encoder).
        ids_pred: (N, Lp) predicted patches, sorted by position (the official ``masked_select`` order).
        ids_restore: (N, L) inverse of the shuffle (for MAE's unshuffle).
        mask: (N, L) float, 1 on predicted patches, 0 elsewhere.
    """
    ids_keep: torch.Tensor
    ids_pred: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def mask_counts(num_patches: int, mask_ratio: float, kept_mask_ratio: float) -> tuple[int, int, int]:
    """(visible, dropped, predicted) patch counts with the official integer rounding:
    ``int(L(1−p))`` visible, ``int(L(p−γ))`` dropped, the rest predicted."""
    L = num_patches
    n_keep = int(L * (1 - mask_ratio))
    n_drop = int(L * (mask_ratio - kept_mask_ratio))
    return n_keep, n_drop, L - n_keep - n_drop


def grid_noise(n: int, grid_size: tuple[int, int], device=None, generator=None) -> torch.Tensor:
    """Noise that makes :func:`random_masking` keep one patch of every 2×2 cell (the top-left one):
    MAE Figure 6's grid-wise sampling, CrossMAE Table 15. Masked patches get U[0,1) noise so the
    predicted subset among them stays random. Shape (n, H·W)."""
    gh, gw = grid_size
    noise = torch.rand(n, gh * gw, device=device, generator=generator)
    keep = ((torch.arange(gh, device=device)[:, None] % 2 == 0)
            & (torch.arange(gw, device=device)[None, :] % 2 == 0)).reshape(-1)
    return noise - 2.0 * keep.to(noise.dtype)


def random_masking(noise: torch.Tensor, mask_ratio: float, kept_mask_ratio: float) -> Masking:
    """Official CrossMAE/MAE masking from given noise (N, L) — see the module docstring.

    Only sorts and gathers index tensors: no host sync, no per-sample Python loop.
    """
    N, L = noise.shape
    n_keep, n_drop, n_pred = mask_counts(L, mask_ratio, kept_mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    ids_pred = ids_shuffle[:, n_keep + n_drop:].sort(dim=1).values
    mask = torch.zeros(N, L, device=noise.device)
    mask.scatter_(1, ids_pred, 1.0)
    return Masking(ids_keep, ids_pred, ids_restore, mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, M) → (N, M, D), without materialising a repeated index."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def check_ratios(mask_ratio: float, kept_mask_ratio: float | None) -> None:
    """Raise ``ValueError`` unless 0 < p < 1 and 0 < γ ≤ p."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    if kept_mask_ratio is not None and not 0.0 < kept_mask_ratio <= mask_ratio + 1e-9:
        raise ValueError(f"prediction ratio (kept_mask_ratio) must satisfy 0 < γ ≤ mask ratio "
                         f"{mask_ratio}, got {kept_mask_ratio}")


# --------------------------------------------------------------------------------------------------
# shared encoder
# --------------------------------------------------------------------------------------------------
class _MaskedViTBase(nn.Module):
    """Encoder, patchify and loss shared by MAE and CrossMAE (official ``MaskedAutoencoderViT``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, norm_pix_loss: bool, final_norm: bool,
                 attn_impl: str, masking: str):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {attn_impl!r}; choose from {ATTN_IMPLS}")
        if masking not in ("random", "grid"):
            raise ValueError(f"unknown masking {masking!r}; choose 'random' or 'grid'")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth = embed_dim, depth
        self.norm_pix_loss = norm_pix_loss
        self.masking = masking
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, attn_impl=attn_impl)
                                     for _ in range(depth)])
        self.norm = LayerNorm(embed_dim) if final_norm else None

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def _init_common(self) -> None:
        """Official initialisation: sin-cos pos embeds, xavier patch_embed / Linear, N(0, .02) tokens."""
        g = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], g).unsqueeze(0))
        if hasattr(self, "decoder_pos_embed"):
            self.decoder_pos_embed.data.copy_(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], g).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- pixels <-> patches -------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, L, p²·3), patch pixels in (row, col, channel) order as MAE."""
        p = self.patch_size
        N, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p²·3) → (N, 3, H, W); inverse of :meth:`patchify` (square grids)."""
        p = self.patch_size
        N, L, _ = x.shape
        h = w = int(math.isqrt(L))
        x = x.reshape(N, h, w, p, p, self.in_chans).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(N, self.in_chans, h * p, w * p)

    # --- masking + encoder -------------------------------------------------------------------
    def make_noise(self, n: int, device) -> torch.Tensor:
        """Masking noise (n, L): U[0,1) for random masking, grid-biased for grid masking."""
        if self.masking == "grid":
            return grid_noise(n, self.patch_embed.grid_size, device=device)
        return torch.rand(n, self.num_patches, device=device)

    def forward_encoder(self, imgs: torch.Tensor, masking: Masking,
                        return_blocks: list[int] | None = None, return_input: bool = False
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the visible patches.

        Args:
            imgs: (N, 3, H, W). masking: from :func:`random_masking`.
            return_blocks: encoder block indices whose outputs to return (inter-block attention).
            return_input: also return the patch-embedding input (with cls token) first.

        Returns:
            ``(x, feats)``: x (N, 1+Lv, D) the last block's output (after ``norm`` when the
            encoder has one); feats the requested maps, each (N, 1+Lv, D), input first.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x = gather_tokens(x, masking.ids_keep)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        feats = [x] if return_input else []
        want = set(return_blocks or ())
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in want:
                feats.append(x)
        if self.norm is not None:
            x = self.norm(x)
        return x, feats

    def pixel_target(self, imgs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction target (N, M, p²·3) at patch ids (all patches when None); per-patch
        normalised ``(t − mean)/sqrt(var + 1e-6)`` (unbiased var, as MAE) when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if ids is not None:
            target = gather_tokens(target, ids)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm names (``cls_token``, ``pos_embed``, ``patch_embed.*``,
        ``blocks.*``, ``norm.*`` when present)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}


# --------------------------------------------------------------------------------------------------
# MAE
# --------------------------------------------------------------------------------------------------
class MAE(_MaskedViTBase):
    """Masked autoencoder (He et al. 2022), official ``models_mae.MaskedAutoencoderViT``.

    The decoder embeds the visible tokens (``decoder_embed``), appends mask tokens, unshuffles,
    adds ``decoder_pos_embed`` and runs self-attention over all L+1 tokens. Loss: per-patch MSE
    averaged over the masked patches.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads: encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (paper 512 / 8 / 16).
        norm_pix_loss: normalise target pixels per patch. attn_impl: see ``crossmae.attention``.
        masking: ``"random"`` or ``"grid"``.

    Raises:
        ValueError: image size not divisible by the patch size; unknown attention or masking.
    """

    method = "mae"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 attn_impl: str = "sdpa", masking: str = "random"):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_pix_loss,
                         final_norm=True, attn_impl=attn_impl, masking=masking)
        L = self.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio,
                                                   attn_impl=attn_impl) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self._init_common()

    def forward_decoder(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """x (N, 1+Lv, D) encoder output → predictions (N, L, p²·3) for every patch."""
        x = self.decoder_embed(x)
        N, L = masking.ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = gather_tokens(x_, masking.ids_restore)
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, kept_mask_ratio: float | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: imgs (N, 3, H, W); mask_ratio p; kept_mask_ratio must be None or p for MAE;
        noise (N, L) optional masking noise (reproducible masks).

        Returns: ``(loss (), pred (N, L, p²·3), mask (N, L) 1 = masked)``.
        """
        check_ratios(mask_ratio, kept_mask_ratio)
        if kept_mask_ratio is not None and abs(kept_mask_ratio - mask_ratio) > 1e-9:
            raise ValueError("MAE reconstructs every masked patch: kept_mask_ratio must equal mask_ratio")
        if noise is None:
            noise = self.make_noise(imgs.shape[0], imgs.device)
        m = random_masking(noise, mask_ratio, mask_ratio)
        latent, _ = self.forward_encoder(imgs, m)
        pred = self.forward_decoder(latent, m)
        target = self.pixel_target(imgs)
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * m.mask).sum() / m.mask.sum()
        return loss, pred, m.mask


# --------------------------------------------------------------------------------------------------
# CrossMAE
# --------------------------------------------------------------------------------------------------
#: Initialisations of the inter-block attention weights (:class:`WeightedFeatureMaps`).
INTER_BLOCK_INITS = ("xavier_uniform", "normal")


class WeightedFeatureMaps(nn.Module):
    """Inter-block attention: mixes k encoder feature maps into one map per decoder block.

    ``linear = Linear(k, decoder_depth, bias=False)``, official ``models_cross.WeightedFeatureMaps``.
    Initialisation (``init``): ``"xavier_uniform"`` (default) — U(−a, a), a = sqrt(6 / (k + depth)),
    what the official code actually trains from: its constructor draws N(0, std 1/sqrt(k)), but the
    model's later ``self.apply(self._init_weights)`` (``MaskedAutoencoderViT.initialize_weights``)
    overwrites every ``nn.Linear`` with xavier-uniform, this one included; ``"normal"`` — the
    N(0, std 1/sqrt(k)) draw the official constructor intended. Like the official module, the
    constructor itself draws N(0, 1/sqrt(k)) (so a seeded :class:`CrossMAE` consumes the random stream
    exactly as ``models_cross.py`` and starts from the same weights); the configured ``init`` is in
    place once the owning :class:`CrossMAE` has run its initialisation (its generic xavier pass, then
    :meth:`reset_parameters` for ``"normal"``). Used on its own, call :meth:`reset_parameters`.

    Variants (``mode``): ``"linear"`` (default, official), ``"softmax"`` (weights softmax-normalised
    over the k maps, paper Table 8), ``"lp"`` (a Linear(D, D) per map before fusion, "+LP", paper
    Table 9; keys ``lp.{j}.*``).

    Input: k tensors (N, T, D). Output: (decoder_depth, N, T, D); entry i feeds decoder block i.
    The fusion is one GEMM over the stacked maps (equal to the official ``linear(stack(..., -1))``).
    """

    def __init__(self, k: int, decoder_depth: int, embed_dim: int, mode: str = "linear",
                 init: str = "xavier_uniform"):
        super().__init__()
        if mode not in ("linear", "softmax", "lp"):
            raise ValueError(f"unknown inter-block attention mode {mode!r}; choose linear, softmax or lp")
        if init not in INTER_BLOCK_INITS:
            raise ValueError(f"unknown inter-block attention init {init!r}; choose from {INTER_BLOCK_INITS}")
        self.k, self.mode, self.init = k, mode, init
        self.linear = nn.Linear(k, decoder_depth, bias=False)
        # the official constructor's draw: a seeded model consumes the random stream as models_cross.py does
        nn.init.normal_(self.linear.weight, mean=0.0, std=1.0 / math.sqrt(k))
        if mode == "lp":
            self.lp = nn.ModuleList([nn.Linear(embed_dim, embed_dim) for _ in range(k)])

    def reset_parameters(self) -> None:
        """(Re)draw ``linear.weight`` with the configured ``init`` (see the class docstring)."""
        if self.init == "normal":
            nn.init.normal_(self.linear.weight, mean=0.0, std=1.0 / math.sqrt(self.k))
        else:
            nn.init.xavier_uniform_(self.linear.weight)

    def weights(self) -> torch.Tensor:
        """(decoder_depth, k) mixing weights as applied (softmax-normalised in ``softmax`` mode)."""
        w = self.linear.weight
        return w.softmax(dim=1) if self.mode == "softmax" else w

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        if len(feature_maps) != self.k:
            raise ValueError(f"expected {self.k} feature maps, got {len(feature_maps)}")
        if self.mode == "lp":
            feature_maps = [lp(f) for lp, f in zip(self.lp, feature_maps)]
        stacked = torch.stack(feature_maps, dim=0)  # (k, N, T, D)
        k = stacked.shape[0]
        out = self.weights().to(stacked.dtype) @ stacked.reshape(k, -1)  # (depth, N·T·D)
        return out.reshape(-1, *stacked.shape[1:])


class CrossMAE(_MaskedViTBase):
    """CrossMAE (Fu et al. 2024), official ``models_cross.MaskedAutoencoderViT``.

    The decoder's queries are ``mask_token + decoder_pos_embed`` at the predicted positions only; they
    never attend to each other (unless ``self_attn``), so each query's output depends only on the
    visible tokens and its own position — decoding any subset gives the same per-patch result.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads: encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (paper 512 / 12 / 16).
        weight_fm: inter-block attention on (then the encoder has no final norm, as the official
            checkpoints). use_fm: encoder blocks to fuse; ``[-1]`` means all blocks, negative ids count
            from the end. use_input: also fuse the patch-embedding output. fm_mode: ``linear`` |
            ``softmax`` | ``lp`` (see :class:`WeightedFeatureMaps`).
        self_attn: add self-attention among queries (Table 3a ablation).
        norm_pix_loss, attn_impl, masking: as :class:`MAE`.
        inter_block_init: ``"xavier_uniform"`` (default: what the official code trains from) or
            ``"normal"`` (N(0, 1/sqrt(k))); see :class:`WeightedFeatureMaps`.

    Raises:
        ValueError: bad sizes, an encoder block id out of range, unknown mode / init / attention /
            masking.
    """

    method = "crossmae"

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 12,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 weight_fm: bool = True, use_fm: list[int] | tuple[int, ...] = (-1,), use_input: bool = False,
                 fm_mode: str = "linear", self_attn: bool = False, attn_impl: str = "sdpa",
                 masking: str = "random", inter_block_init: str = "xavier_uniform"):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, norm_pix_loss,
                         final_norm=not weight_fm, attn_impl=attn_impl, masking=masking)
        L = self.num_patches
        self.weight_fm, self.use_input, self.fm_mode = weight_fm, use_input, fm_mode
        use_fm = list(use_fm)
        if use_fm == [-1]:
            self.use_fm = list(range(depth))
        else:
            self.use_fm = sorted({i if i >= 0 else depth + i for i in use_fm})
            bad = [i for i in self.use_fm if not 0 <= i < depth]
            if bad:
                raise ValueError(f"use_fm names encoder blocks {bad} outside 0..{depth - 1}")
        if weight_fm:
            self.dec_norms = nn.ModuleList([LayerNorm(embed_dim) for _ in range(decoder_depth)])
            self.wfm = WeightedFeatureMaps(len(self.use_fm) + int(use_input), decoder_depth, embed_dim, fm_mode,
                                           init=inter_block_init)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio, self_attn=self_attn,
                                attn_impl=attn_impl) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self._init_common()  # xavier-uniform on every Linear, wfm.linear included (as the official code)
        if weight_fm and self.wfm.init == "normal":
            self.wfm.reset_parameters()

    def encode(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor | list[torch.Tensor]:
        """Encoder features the decoder reads: the list of fused maps with inter-block attention,
        else the normed last map (N, 1+Lv, D)."""
        if self.weight_fm:
            _, feats = self.forward_encoder(imgs, masking, return_blocks=self.use_fm, return_input=self.use_input)
            return feats
        x, _ = self.forward_encoder(imgs, masking)
        return x

    def queries(self, ids_pred: torch.Tensor) -> torch.Tensor:
        """Decoder queries at patch positions ids_pred (N, M): ``decoder_pos_embed + mask_token``,
        (N, M, dec)."""
        pos = self.decoder_pos_embed[0, 1:, :]
        return pos[ids_pred] + self.mask_token

    def forward_decoder(self, y: torch.Tensor | list[torch.Tensor], ids_pred: torch.Tensor,
                        return_intermediates: bool = False):
        """Decode the queries at ``ids_pred`` (N, M).

        Returns:
            pred (N, M, p²·3); with ``return_intermediates`` also the list of the decoder's hidden
            state after each block (N, M, dec), used for the per-block contribution figure.
        """
        x = self.queries(ids_pred)
        inter = []
        if self.weight_fm:
            fused = self.wfm(y)
            for i, blk in enumerate(self.decoder_blocks):
                x = blk(x, self.dec_norms[i](fused[i]))
                if return_intermediates:
                    inter.append(x)
        else:
            for blk in self.decoder_blocks:
                x = blk(x, y)
                if return_intermediates:
                    inter.append(x)
        pred = self.decoder_pred(self.decoder_norm(x))
        return (pred, inter) if return_intermediates else pred

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, kept_mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: imgs (N, 3, H, W); mask ratio p; prediction ratio γ (fraction of ALL patches,
        0 < γ ≤ p); noise (N, L) optional masking noise.

        Returns: ``(loss (), pred (N, Lp, p²·3) at the predicted patches in position order,
        mask (N, L) 1 = predicted)``.

        Raises:
            ValueError: γ > p or γ ≤ 0, p outside (0, 1).
        """
        if kept_mask_ratio is None:
            kept_mask_ratio = mask_ratio
        check_ratios(mask_ratio, kept_mask_ratio)
        if noise is None:
            noise = self.make_noise(imgs.shape[0], imgs.device)
        m = random_masking(noise, mask_ratio, kept_mask_ratio)
        pred = self.forward_decoder(self.encode(imgs, m), m.ids_pred)
        target = self.pixel_target(imgs, m.ids_pred)
        loss = ((pred - target) ** 2).mean()
        return loss, pred, m.mask


# --------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------
def parse_model_name(name: str) -> tuple[str, str]:
    """``"crossmae_vit_base_patch16"`` → ``("crossmae", "vit_base_patch16")``.

    Raises:
        ValueError: unknown method or architecture.
    """
    for method in ("crossmae", "mae"):
        if name.startswith(method + "_"):
            arch = name[len(method) + 1:]
            get_arch(arch)
            return method, arch
    raise ValueError(f"unknown model {name!r}: expected mae_<arch> or crossmae_<arch>, arch in {sorted(ARCHS)}")


def create_model(name: str, **kwargs) -> MAE | CrossMAE:
    """Build ``mae_<arch>`` or ``crossmae_<arch>`` (arch from :data:`ARCHS`) with the paper's decoder
    defaults (MAE 8 blocks; CrossMAE 12 blocks, inter-block attention over all encoder blocks).
    ``kwargs`` override any constructor argument (``img_size``, ``decoder_depth``, ``weight_fm``…).

    Raises:
        ValueError: unknown name, or invalid constructor arguments.
    """
    method, arch_name = parse_model_name(name)
    a = ARCHS[arch_name]
    cfg = dict(patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
               decoder_embed_dim=a.decoder_embed_dim, decoder_num_heads=a.decoder_num_heads)
    if method == "mae":
        cfg["decoder_depth"] = a.mae_decoder_depth
        cfg.update(kwargs)
        return MAE(**cfg)
    cfg["decoder_depth"] = a.crossmae_decoder_depth
    cfg.update(kwargs)
    return CrossMAE(**cfg)
