"""The one attention function every model of the suite calls.

Selection is per module (an ``attn_impl`` attribute set at construction or with
:func:`set_attn_impl`), never by patching ``torch.nn.functional`` globally (the official CrossMAE
repository replaces ``F.scaled_dot_product_attention`` process-wide; REFERENCE.md §7).

Implementations:
    ``"sdpa"``  ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2 /
                memory-efficient kernels on CUDA, a fused C++ kernel on CPU). The default.
    ``"flash"`` the ``flash-attn`` package's ``flash_attn_func`` (optional extra ``[flash]``), used
                only for CUDA tensors in fp16/bf16 with head dim ≤ 256; otherwise falls back to SDPA.
    ``"math"``  explicit ``softmax(q kᵀ / sqrt(d)) v`` in the input dtype; returns the attention
                probabilities too, which the visualisations need.
    ``"auto"``  ``"flash"`` when flash-attn is importable and the tensors are eligible, else SDPA.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("auto", "sdpa", "flash", "math")


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except Exception:  # not installed, or built for another torch / CUDA
        return None
    return flash_attn_func


def flash_available() -> bool:
    """True when the ``flash-attn`` package imports and CUDA is available."""
    return torch.cuda.is_available() and _flash_attn_func() is not None


def _flash_eligible(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa",
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, scale ``1/sqrt(head_dim)``, no mask.

    Args:
        q: (B, H, Nq, d) queries.
        k, v: (B, H, Nk, d) keys and values.
        impl: one of :data:`ATTN_IMPLS`.
        dropout_p: attention dropout probability (training only; pass 0.0 at eval).

    Returns:
        (B, H, Nq, d).

    Raises:
        ValueError: unknown ``impl``.
    """
    if impl in ("auto", "flash"):
        fn = _flash_attn_func()
        if fn is not None and _flash_eligible(q):
            # flash-attn takes (B, N, H, d)
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
            return out.transpose(1, 2)
        impl = "sdpa"
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if impl == "math":
        return attention_with_probs(q, k, v, dropout_p)[0]
    raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The math path: returns ``(out (B,H,Nq,d), probs (B,H,Nq,Nk))``; probs rows sum to 1."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs_d = F.dropout(probs, p=dropout_p)
    else:
        probs_d = probs
    return probs_d @ v, probs


class AttentionBase(nn.Module):
    """Mixin state for attention modules: the implementation name and optional probability capture.

    Attributes:
        attn_impl: the :func:`attention` implementation this module uses.
        record_attn: when True, the module runs the math path and keeps the last probabilities in
            ``last_attn`` (B, H, Nq, Nk), detached — for the visualisations only.
    """

    def __init__(self, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attention implementation {attn_impl!r}; choose from {ATTN_IMPLS}")
        self.attn_impl = attn_impl
        self.record_attn = False
        self.last_attn: torch.Tensor | None = None

    def _attend(self, q, k, v, dropout_p: float) -> torch.Tensor:
        if self.record_attn:
            out, probs = attention_with_probs(q, k, v, dropout_p)
            self.last_attn = probs.detach()
            return out
        return attention(q, k, v, self.attn_impl, dropout_p)


class SelfAttention(AttentionBase):
    """Multi-head self-attention with a fused ``qkv`` projection (timm / MAE key names).

    Args:
        dim: token width D. num_heads: H (D must be divisible by H). qkv_bias: bias on ``qkv``.

    Input / output: (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__(attn_impl)
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self._attend(q, k, v, self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class CrossAttention(AttentionBase):
    """CrossMAE cross-attention: queries from the decoder, keys/values from encoder features.

    ``q = Linear(dec, dec)``, ``kv = Linear(enc, 2·dec)`` — the encoder→decoder width change lives
    here (CrossMAE ``transformer_utils.CrossAttention``; there is no ``decoder_embed``).

    Args:
        encoder_dim: width of the key/value input. decoder_dim: width of the queries and output.

    Input: x (B, Nq, dec), y (B, Nk, enc). Output: (B, Nq, dec).
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__(attn_impl)
        if decoder_dim % num_heads:
            raise ValueError(f"decoder width {decoder_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(decoder_dim, decoder_dim, bias=qkv_bias)
        self.kv = nn.Linear(encoder_dim, decoder_dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(decoder_dim, decoder_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        Ny = y.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        kv = self.kv(y).reshape(B, Ny, 2, h, C // h).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = self._attend(q, k, v, self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set ``attn_impl`` on every attention module of ``model`` (in place). Returns ``model``.

    Raises:
        ValueError: unknown ``impl``.
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTN_IMPLS}")
    for m in model.modules():
        if isinstance(m, AttentionBase):
            m.attn_impl = impl
    return model


def record_attention(model: nn.Module, on: bool = True) -> nn.Module:
    """Turn probability capture on/off for every attention module (see :class:`AttentionBase`)."""
    for m in model.modules():
        if isinstance(m, AttentionBase):
            m.record_attn = on
            if not on:
                m.last_attn = None
    return model
