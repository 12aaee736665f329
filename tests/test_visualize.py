"""`python -m crossmae.visualize` on tiny random-weight checkpoints (ViT-tiny, 64 px, 16 patches)."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae import visualize as V
from crossmae.models import create_model, random_masking

SIZE = 64
P = 16


def _ckpt(path, net, **args):
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(**args)}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vis")
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", img_size=SIZE, norm_pix_loss=True)
    cm = create_model("crossmae_vit_tiny_patch16", img_size=SIZE, decoder_depth=3, use_input=True)
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return {
        "dir": d, "imgs": imgs, "mae_model": mae, "cm_model": cm,
        # official CrossMAE checkpoints name the model 'mae_vit_…'
        "mae": _ckpt(d / "mae.pth", mae, model="mae_vit_tiny_patch16", input_size=SIZE, norm_pix_loss=True,
                     mask_ratio=0.75),
        "cm": _ckpt(d / "cm.pth", cm, model="mae_vit_tiny_patch16", input_size=SIZE, decoder_depth=3,
                    weight_fm=True, use_fm=[-1], use_input=True, norm_pix_loss=False),
    }


def _panel(img: np.ndarray, r: int, c: int) -> np.ndarray:
    x0, y0 = V.PAD + c * (SIZE + V.PAD), V.HEADER + V.PAD + r * (SIZE + V.PAD)
    return img[y0:y0 + SIZE, x0:x0 + SIZE]


def test_figures_written_with_expected_panels(files, tmp_path, capsys):
    out = tmp_path / "figs"
    V.main(["--mae", str(files["mae"]), "--crossmae", str(files["cm"]), "--images", str(files["imgs"]),
            "--output-dir", str(out), "--seed", "3"])
    printed = capsys.readouterr().out
    for name in ("reconstructions.png", "crossmae_block_contributions.png", "crossmae_interblock_attention.png",
                 "mae_attention_mass.png", "summary.json"):
        assert (out / name).is_file() and str(out / name) in printed
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))

    rec = np.asarray(Image.open(out / "reconstructions.png").convert("RGB"))
    ncols, nrows = 4, 2                                   # original | masked | MAE | CrossMAE ; 2 images
    assert rec.shape == (V.HEADER + nrows * SIZE + (nrows + 1) * V.PAD, ncols * SIZE + (ncols + 1) * V.PAD, 3)

    # same fixed mask for both models: visible patches equal the original in the masked / MAE /
    # CrossMAE panels, and exactly the ids_keep of random_masking(noise(seed + i))
    noise = V.masking_noise(2, (SIZE // P) ** 2, 3)
    for r in range(nrows):
        keep = set(random_masking(noise[r:r + 1], 0.75, 0.75).ids_keep[0].tolist())
        orig = _panel(rec, r, 0).astype(int)
        src = np.asarray(Image.open(files["imgs"] / f"im{r}.png").convert("RGB")).astype(int)
        assert np.abs(orig - src).max() <= 1
        mean_rgb = np.round(np.array(V.IMAGENET_MEAN) * 255).astype(int)
        for c in (1, 2, 3):
            pan = _panel(rec, r, c).astype(int)
            for idx in range(16):
                y, x = divmod(idx, 4)
                cell = (slice(y * P, (y + 1) * P), slice(x * P, (x + 1) * P))
                if idx in keep:                       # visible: pasted back unchanged
                    assert np.abs(pan[cell] - orig[cell]).max() <= 1
                elif c == 1:                          # masked panel: mean colour where masked
                    assert np.abs(pan[cell] - mean_rgb).max() <= 1

    s = json.loads((out / "summary.json").read_text())
    w = np.array(s["interblock_weights"])
    assert w.shape == (3, 4 + 1)                          # decoder_depth × k (4 encoder blocks + input)
    np.testing.assert_allclose(w, files["cm_model"].wfm.weights().detach().numpy(), rtol=1e-6)
    assert s["block_decomposition_max_abs_error"] < 1e-4
    contrib = Image.open(out / "crossmae_block_contributions.png")
    assert contrib.size == (4 * SIZE + 5 * V.PAD, V.HEADER + 4 * SIZE + 5 * V.PAD)  # tok+pos + 3 blocks; 2 rows/image


def test_attention_mass_matches_manual_computation(files):
    """Recompute the MAE decoder's attention probabilities by hand (qkv → softmax) and compare."""
    model = files["mae_model"]
    imgs = V.normalize(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    noise = V.masking_noise(2, 16, 0)
    got = V.mae_attention_mass(model, imgs, noise, 0.75)

    m = random_masking(noise, 0.75, 0.75)
    with torch.no_grad():
        latent, _ = model.forward_encoder(imgs, m)
        x = model.decoder_embed(latent)
        mt = model.mask_token.expand(2, 16 + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mt], 1)
        x_ = torch.gather(x_, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], 1) + model.decoder_pos_embed
        for b, blk in enumerate(model.decoder_blocks):
            h = blk.attn.num_heads
            qkv = blk.attn.qkv(blk.norm1(x)).reshape(2, 17, 3, h, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)  # (N, 17, 17)
            for n in range(2):
                masked = [1 + i for i in range(16) if m.mask[n, i] == 1]
                vis = [0] + [1 + i for i in range(16) if m.mask[n, i] == 0]
                rows = probs[n][masked]
                exp_vis = float(rows[:, vis].sum(-1).mean())
                exp_mask = float(rows[:, masked].sum(-1).mean())
                if n == 0:
                    acc_v, acc_m = exp_vis / 2, exp_mask / 2
                else:
                    acc_v, acc_m = acc_v + exp_vis / 2, acc_m + exp_mask / 2
            assert got["visible"][b] == pytest.approx(acc_v, abs=1e-5)
            assert got["mask"][b] == pytest.approx(acc_m, abs=1e-5)
            assert got["visible"][b] + got["mask"][b] == pytest.approx(1.0, abs=1e-5)
            x = blk(x)
    assert got["visible_sum"] == pytest.approx(sum(got["visible"]))


def test_block_contributions_sum_to_prediction(files):
    model = files["cm_model"]
    imgs = V.normalize(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
    noise = V.masking_noise(2, 16, 5)
    dec = V.block_contributions(model, imgs, noise, 0.75, 0.25)
    assert dec["terms"].shape == (3 + 1, 2, 4, P * P * 3)       # D+1 terms, 4 = int(16·0.25) predicted
    with torch.no_grad():
        _, pred, _ = model(imgs, 0.75, 0.25, noise=noise)
    torch.testing.assert_close(dec["terms"].sum(0), pred, atol=1e-4, rtol=1e-4)
    assert dec["max_abs_error"] < 1e-4


def test_norm_pix_unnormalisation_uses_target_patch_stats(files):
    model = files["mae_model"]                                   # norm_pix_loss=True
    imgs = V.normalize(torch.rand(1, 3, SIZE, SIZE))
    target = model.pixel_target(imgs)                            # normalised per patch
    back = V.unnormalize_pred(model, imgs, target, None)
    torch.testing.assert_close(back, model.patchify(imgs), atol=1e-4, rtol=1e-4)


def test_bare_state_dict_needs_model_and_loads_with_it(files, tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save(files["cm_model"].state_dict(), bare)
    with pytest.raises(V.UserError, match="bare state dict needs --model"):
        V.build_from_checkpoint(bare, "crossmae")
    model, info = V.build_from_checkpoint(bare, "crossmae", "crossmae_vit_tiny_patch16", SIZE)
    assert info["model"] == "crossmae_vit_tiny_patch16" and len(model.decoder_blocks) == 3 and model.use_input


@pytest.mark.parametrize("case", ["mismatch", "wrong_flag", "no_ckpt", "bad_image"])
def test_bad_input_is_one_line_error_and_writes_nothing(files, tmp_path, capsys, case):
    out = tmp_path / "figs"
    argv = ["--output-dir", str(out), "--images", str(files["imgs"])]
    if case == "mismatch":   # args say decoder depth 2 but the weights have 3 blocks
        bad = _ckpt(tmp_path / "bad.pth", files["cm_model"], model="crossmae_vit_tiny_patch16", input_size=SIZE,
                    decoder_depth=2, use_fm=[-1], use_input=True)
        argv += ["--mae", str(files["mae"]), "--crossmae", str(bad)]
        expect = str(bad)
    elif case == "wrong_flag":
        argv += ["--crossmae", str(files["mae"])]
        expect = str(files["mae"])
    elif case == "no_ckpt":
        expect = "--mae"
    else:
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        argv = ["--output-dir", str(out), "--images", str(broken), "--mae", str(files["mae"])]
        expect = str(broken)
    with pytest.raises(SystemExit) as ei:
        V.main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0]
    assert not out.exists() or not any(out.iterdir())
