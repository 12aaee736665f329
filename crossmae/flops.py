"""FLOP counts of the MAE / CrossMAE pretraining models (``torch.utils.flop_counter.FlopCounterMode``).

Conventions (those of ``FlopCounterMode``): one multiply-add = 2 FLOPs; only matrix products,
convolutions and scaled-dot-product attention are counted (LayerNorm, GELU, softmax, adds are not),
so the numbers are the GEMM work, as in the CrossMAE paper's decoder-FLOPs comparison (Tables 4–5,
Appendix C). All counts are per image: measured at batch 1 (they are linear in the batch).

The decoder's share is ``total − encoder``, where the encoder is counted by running
``forward_encoder`` (MAE) / ``encode`` (CrossMAE, which returns the fused maps' sources) on the
same mask. For CrossMAE the inter-block fusion (``wfm``), the ``dec_norms`` and the cross-attention
``kv`` projections (the encoder→decoder width change) are decoder work, as in the paper.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import CrossMAE, MAE, random_masking


def count_flops(model: MAE | CrossMAE, mask_ratio: float, kept_mask_ratio: float,
                device: torch.device | str = "cpu", backward: bool = True, seed: int = 0) -> dict[str, float]:
    """FLOPs per image of one pretraining step's model computation.

    Args:
        model: an MAE or CrossMAE (any device; left in the mode it was in).
        mask_ratio, kept_mask_ratio: p and γ (γ = p for MAE).
        device: where to run the counting pass.
        backward: also count forward+backward (one extra backward at batch 1).
        seed: seeds the image and the masking noise (counts do not depend on them).

    Returns:
        ``{"total_fwd", "encoder_fwd", "decoder_fwd"}`` and with ``backward`` also ``"total_fwdbwd"``,
        in FLOPs per image (float).
    """
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(1, model.in_chans, model.img_size, model.img_size, generator=g).to(device)
    noise = torch.rand(1, model.num_patches, generator=g).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fc = FlopCounterMode(display=False)
            with fc:
                model(imgs, mask_ratio, kept_mask_ratio, noise=noise)
            total = fc.get_total_flops()
            m = random_masking(noise, mask_ratio, kept_mask_ratio if isinstance(model, CrossMAE) else mask_ratio)
            fc = FlopCounterMode(display=False)
            with fc:
                if isinstance(model, CrossMAE):
                    model.encode(imgs, m)
                else:
                    model.forward_encoder(imgs, m)
            enc = fc.get_total_flops()
        out = {"total_fwd": float(total), "encoder_fwd": float(enc), "decoder_fwd": float(total - enc)}
        if backward:
            fc = FlopCounterMode(display=False)
            with fc:
                loss, _, _ = model(imgs, mask_ratio, kept_mask_ratio, noise=noise)
                loss.backward()
            model.zero_grad(set_to_none=True)
            out["total_fwdbwd"] = float(fc.get_total_flops())
        return out
    finally:
        model.train(was_training)
