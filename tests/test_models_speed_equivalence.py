"""CrossMAE's decoder equals a plain re-statement of the official computation.

Official (TonyLianLong/CrossMAE ``models_cross.py``): ``WeightedFeatureMaps.forward`` stacks the k
feature maps on a last axis, ``(B, L, C, k)``, applies ``Linear(k, depth, bias=False)`` and decoder
block i reads ``dec_norms[i](x[..., i])``. ``crossmae.models`` fuses with one GEMM over ``(k, B·L·C)``
(a layout chosen for speed); outputs and every gradient must match to float tolerance. Guards any
later speed edit of the decoder path.
"""
from __future__ import annotations

import pytest
import torch

from crossmae.models import create_model, random_masking


def _official_decoder(model, feats, ids_pred):
    x = model.queries(ids_pred)
    fused = model.wfm.linear(torch.stack(feats, dim=-1))        # (B, T, C, depth)
    for i, blk in enumerate(model.decoder_blocks):
        x = blk(x, model.dec_norms[i](fused[..., i]))
    return model.decoder_pred(model.decoder_norm(x))


@pytest.mark.parametrize("gamma,use_input", [(0.25, True), (0.75, False)])
def test_fast_decoder_matches_official_statement(gamma, use_input):
    torch.manual_seed(0)
    model = create_model("crossmae_vit_tiny_patch16", img_size=64, decoder_depth=3, use_input=use_input,
                         norm_pix_loss=True)
    imgs = torch.randn(3, 3, 64, 64)
    noise = torch.rand(3, model.num_patches)
    m = random_masking(noise, 0.75, gamma)

    def run(fast: bool):
        model.zero_grad(set_to_none=True)
        feats = model.encode(imgs, m)
        pred = model.forward_decoder(feats, m.ids_pred) if fast else _official_decoder(model, feats, m.ids_pred)
        loss = ((pred - model.pixel_target(imgs, m.ids_pred)) ** 2).mean()
        loss.backward()
        return pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pred_f, grads_f = run(True)
    pred_o, grads_o = run(False)
    torch.testing.assert_close(pred_f, pred_o, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_o.keys() and "wfm.linear.weight" in grads_f
    for name in grads_o:
        torch.testing.assert_close(grads_f[name], grads_o[name], rtol=1e-4, atol=1e-6, msg=name)

    # the public forward goes through the same path: same loss as the official statement
    loss, pred, mask = model(imgs, 0.75, gamma, noise=noise)
    torch.testing.assert_close(pred.detach(), pred_o, rtol=1e-5, atol=1e-5)
    assert mask.sum(1).tolist() == [m.ids_pred.shape[1]] * 3


def test_intermediates_unchanged():
    torch.manual_seed(1)
    model = create_model("crossmae_vit_tiny_patch16", img_size=64, decoder_depth=2)
    imgs = torch.randn(2, 3, 64, 64)
    m = random_masking(torch.rand(2, model.num_patches), 0.75, 0.5)
    with torch.no_grad():
        feats = model.encode(imgs, m)
        pred, inter = model.forward_decoder(feats, m.ids_pred, return_intermediates=True)
        assert len(inter) == 2
        torch.testing.assert_close(model.decoder_pred(model.decoder_norm(inter[-1])), pred)
        torch.testing.assert_close(pred, _official_decoder(model, feats, m.ids_pred), rtol=1e-5, atol=1e-5)
