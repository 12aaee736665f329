"""MAE / CrossMAE models: official layouts, masking semantics, partial-decoding invariance, losses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossmae.attention import attention, set_attn_impl
from crossmae.models import (CrossMAE, create_model, grid_noise, mask_counts, random_masking,
                             sincos_pos_embed_2d)


def tiny(name="crossmae_vit_tiny_patch16", **kw):
    torch.manual_seed(0)
    return create_model(name, img_size=64, **kw).eval()


# ---------------------------------------------------------------- official state-dict layouts
DATA = Path(__file__).parent / "data"


def _official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of a reference model's state dict (tests/data, taken from the official code)."""
    doc = json.loads((DATA / name).read_text())
    assert doc["num_keys"] == len(doc["keys"])
    return {k: tuple(v) for k, v in doc["keys"].items()}


def _layout(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _layout_diff(ours: dict, ref: dict) -> str:
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    shape = sorted(k for k in set(ours) & set(ref) if ours[k] != ref[k])
    return f"missing {missing[:5]}, unexpected {extra[:5]}, shape {[(k, ours[k], ref[k]) for k in shape[:5]]}"


def test_mae_vit_base_state_dict_equals_official_layout():
    ref = _official_keys("official_keys_mae_vit_base.json")  # facebookresearch/mae models_mae.py
    assert len(ref) == 254  # REFERENCE.md §2
    ours = _layout(create_model("mae_vit_base_patch16"))
    assert ours == ref, _layout_diff(ours, ref)


def test_crossmae_vit_base_state_dict_equals_official_layout():
    ref = _official_keys("official_keys_crossmae_vit_base.json")  # TonyLianLong/CrossMAE models_cross.py
    assert len(ref) == 347  # REFERENCE.md §1: decoder 12, use_input
    sd = create_model("crossmae_vit_base_patch16", use_input=True).state_dict()
    ours = {k: tuple(v.shape) for k, v in sd.items()}
    assert ours == ref, _layout_diff(ours, ref)
    enc = sum(v.numel() for k, v in sd.items() if k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks")))
    dec = sum(v.numel() for k, v in sd.items() if not k.startswith(("cls_token", "pos_embed", "patch_embed",
                                                                     "blocks")))
    assert round(enc / 1e6, 1) == 85.8 and round(dec / 1e6, 1) == 41.5  # REFERENCE.md §1


def test_ablation_layouts():
    sa = tiny(self_attn=True).state_dict()
    assert "decoder_blocks.0.norm0.weight" in sa and "decoder_blocks.0.self_attn.qkv.weight" in sa
    lp = tiny(fm_mode="lp").state_dict()
    assert "wfm.lp.3.weight" in lp
    last2 = tiny(use_fm=[-2, -1])
    assert last2.use_fm == [2, 3] and last2.wfm.linear.weight.shape == (2, 2)
    no_ib = tiny(weight_fm=False).state_dict()
    assert "norm.weight" in no_ib and not any(k.startswith(("wfm", "dec_norms")) for k in no_ib)


def _wide_wfm(**kw):
    """A CrossMAE whose inter-block weight is large (48 x 25) with k != decoder depth, so the two inits
    differ in spread: xavier-uniform std sqrt(2 / (k + depth)) = 0.166, normal std 1/sqrt(k) = 0.2."""
    torch.manual_seed(0)
    return CrossMAE(img_size=32, patch_size=16, embed_dim=16, depth=24, num_heads=2, decoder_embed_dim=16,
                    decoder_depth=48, decoder_num_heads=2, use_input=True, **kw).wfm.linear.weight.detach()


def test_inter_block_init_and_softmax_variant():
    # default = what the official code executes: its self.apply(_init_weights) overwrites the
    # N(0, 1/sqrt(k)) draw of WeightedFeatureMaps with xavier-uniform, U(-a, a), a = sqrt(6 / (k + depth))
    w = _wide_wfm()
    k, depth = 25, 48
    a = math.sqrt(6 / (k + depth))
    assert w.shape == (depth, k) and w.abs().max() <= a
    assert w.abs().max() > 0.95 * a  # fills the interval (1200 draws)
    assert abs(w.std().item() - a / math.sqrt(3)) < 0.01  # 0.166; a normal 1/sqrt(k) draw has 0.2
    # the N(0, 1/sqrt(k)) draw, kept as an option: wider, and not bounded by the xavier interval
    n = _wide_wfm(inter_block_init="normal")
    assert abs(n.std().item() - 1 / math.sqrt(k)) < 0.01
    assert (n.abs() > a).sum() > 100  # ~15% of normal draws lie outside (-a, a)
    # ViT-B (k = 13 maps with the input, 12 decoder blocks): the default stays inside the xavier bound
    # (a normal 1/sqrt(13) draw of 156 values leaves it with probability 1 - 4e-6)
    torch.manual_seed(0)
    vb = create_model("crossmae_vit_base_patch16", use_input=True).wfm.linear.weight
    assert vb.abs().max() <= math.sqrt(6 / (13 + 12))
    with pytest.raises(ValueError, match="unknown inter-block attention init 'kaiming'"):
        tiny(inter_block_init="kaiming")
    s = tiny(fm_mode="softmax").wfm.weights()
    assert torch.allclose(s.sum(dim=1), torch.ones(s.shape[0]))


def test_sincos_matches_mae_numpy_formula():
    # re-statement of MAE util/pos_embed.get_2d_sincos_pos_embed
    dim, g = 16, 3
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, g, g)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    ref = np.concatenate([np.zeros([1, dim]), ref], axis=0)
    assert np.allclose(sincos_pos_embed_2d(dim, g).numpy(), ref, atol=1e-6)


# ---------------------------------------------------------------- masking
def test_mask_counts_official_rounding():
    assert mask_counts(196, 0.75, 0.25) == (49, 98, 49)
    assert mask_counts(196, 0.75, 0.75) == (49, 0, 147)


def test_random_masking_equals_official_algorithm():
    torch.manual_seed(3)
    N, L, p, g = 4, 196, 0.75, 0.25
    noise = torch.rand(N, L)
    m = random_masking(noise, p, g)
    # official models_cross.random_masking, restated
    len_keep, len_masked = int(L * (1 - p)), int(L * (p - g))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(N, L)
    mask[:, :len_keep + len_masked] = 0
    mask = torch.gather(mask, 1, ids_restore)
    assert torch.equal(m.mask, mask)
    assert torch.equal(m.ids_keep, ids_shuffle[:, :len_keep])
    assert torch.equal(m.ids_restore, ids_restore)
    # the official queries come from masked_select, i.e. in position order
    assert torch.equal(m.ids_pred, mask.nonzero()[:, 1].reshape(N, -1))


def test_grid_masking_keeps_one_of_every_four():
    model = tiny("mae_vit_tiny_patch16", masking="grid")
    noise = grid_noise(2, model.patch_embed.grid_size)
    m = random_masking(noise, 0.75, 0.75)
    kept = sorted(m.ids_keep[0].tolist())
    assert kept == [0, 2, 8, 10]  # 4x4 grid: rows 0,2 × cols 0,2
    assert m.mask.sum(1).tolist() == [12.0, 12.0]


@pytest.mark.parametrize("kw", [dict(mask_ratio=0.75, kept_mask_ratio=0.8), dict(mask_ratio=0.75, kept_mask_ratio=0.0),
                                dict(mask_ratio=1.0, kept_mask_ratio=0.5)])
def test_bad_ratios_raise(kw):
    with pytest.raises(ValueError, match="ratio"):
        tiny()(torch.randn(1, 3, 64, 64), **kw)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("mae_vit_tiny_patch16", img_size=70)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("crossmae_vit_gigantic_patch16")
    with pytest.raises(ValueError, match="use_fm"):
        create_model("crossmae_vit_tiny_patch16", img_size=64, use_fm=[7])


# ---------------------------------------------------------------- the paper's central property
@pytest.mark.parametrize("kw", [dict(), dict(weight_fm=False), dict(fm_mode="lp", use_input=True)])
def test_crossmae_query_depends_only_on_visible_tokens_and_its_position(kw):
    model = tiny(**kw)
    torch.manual_seed(1)
    imgs = torch.randn(2, 3, 64, 64)
    m = random_masking(torch.rand(2, 16), 0.75, 0.75)  # 4 visible, 12 masked, all predicted
    with torch.no_grad():
        y = model.encode(imgs, m)
        full = model.forward_decoder(y, m.ids_pred)  # (2, 12, 768)
        for sub in ([0], [3, 7], [11, 0, 5], list(range(12))[::-1]):
            part = model.forward_decoder(y, m.ids_pred[:, sub])
            assert torch.allclose(part, full[:, sub], atol=1e-5), sub


def test_self_attention_ablation_breaks_the_independence():
    # the same check must fail when queries attend to each other (Table 3a ablation)
    model = tiny(self_attn=True)
    imgs = torch.randn(1, 3, 64, 64)
    m = random_masking(torch.rand(1, 16), 0.75, 0.75)
    with torch.no_grad():
        y = model.encode(imgs, m)
        full = model.forward_decoder(y, m.ids_pred)
        part = model.forward_decoder(y, m.ids_pred[:, :2])
    assert not torch.allclose(part, full[:, :2], atol=1e-5)


# ---------------------------------------------------------------- forward equals the official computation
def _official_crossmae_forward(model: CrossMAE, imgs, noise, p, g):
    """Re-statement of models_cross.MaskedAutoencoderViT.forward (masked_select, stack + Linear)."""
    N, L = noise.shape
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    len_keep, len_masked = int(L * (1 - p)), int(L * (p - g))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    mask = torch.ones(N, L)
    mask[:, :len_keep + len_masked] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([model.cls_token.expand(N, -1, -1), x], dim=1)
    feats = [x] if model.use_input else []
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        if i in model.use_fm:
            feats.append(x)
    q = model.decoder_pos_embed[:, 1:].masked_select(mask.bool().unsqueeze(-1)).reshape(N, -1, model.mask_token.shape[-1])
    q = q + model.mask_token
    y = model.wfm.linear(torch.stack(feats, dim=-1))
    for i, blk in enumerate(model.decoder_blocks):
        q = blk(q, model.dec_norms[i](y[..., i]))
    pred = model.decoder_pred(model.decoder_norm(q))
    target = model.patchify(imgs).masked_select(mask.bool().unsqueeze(-1)).reshape(N, -1, pred.shape[-1])
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    return ((pred - target) ** 2).mean(), pred


def test_crossmae_forward_equals_official_restatement():
    model = tiny(use_input=True, norm_pix_loss=True)
    torch.manual_seed(2)
    imgs, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, 0.25, noise=noise)
        ref_loss, ref_pred = _official_crossmae_forward(model, imgs, noise, 0.75, 0.25)
    assert pred.shape == (3, 4, 768) and mask.sum().item() == 12
    assert torch.allclose(pred, ref_pred, atol=1e-5)
    assert torch.allclose(loss, ref_loss, atol=1e-6)


def test_mae_loss_is_mean_over_masked_patches():
    model = tiny("mae_vit_tiny_patch16")
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, noise=noise)
    assert pred.shape == (2, 16, 768) and mask.sum().item() == 24
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean(), atol=1e-6)
    # a fixed noise reproduces the same mask and loss
    with torch.no_grad():
        assert torch.equal(model(imgs, 0.75, noise=noise)[2], mask)


def test_patchify_roundtrip():
    model = tiny()
    imgs = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_every_trainable_parameter_gets_a_gradient_and_pos_embeds_stay_fixed():
    model = tiny(use_input=True).train()
    loss, _, _ = model(torch.randn(2, 3, 64, 64), 0.75, 0.25)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


# ---------------------------------------------------------------- attention dispatch
def test_attention_paths_agree_and_selection_is_per_model():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    assert torch.allclose(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5)
    assert torch.allclose(attention(q, k, v, "auto"), attention(q, k, v, "math"), atol=1e-5)  # CPU: SDPA
    a, b = tiny(), tiny()
    set_attn_impl(a, "math")
    assert {m.attn_impl for m in b.modules() if hasattr(m, "attn_impl")} == {"sdpa"}
    assert F.scaled_dot_product_attention.__module__.startswith("torch")
    imgs, noise = torch.randn(1, 3, 64, 64), torch.rand(1, 16)
    with torch.no_grad():
        assert torch.allclose(a(imgs, 0.75, 0.25, noise=noise)[1], b(imgs, 0.75, 0.25, noise=noise)[1], atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        set_attn_impl(a, "xformers")
