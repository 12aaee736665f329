"""Figures of MAE / CrossMAE pretraining checkpoints (CrossMAE paper Figures 1b, 2, 5).

    python -m crossmae.visualize --mae mae.pth --crossmae crossmae.pth --output-dir figs
    python -m crossmae.visualize --crossmae sd.pth --model crossmae_vit_base_patch16 --input-size 224 \\
        --images photo1.jpg photo2.jpg --output-dir figs

Figures (PNG, written atomically into ``--output-dir``; each path is printed):

``reconstructions.png`` (paper Figure 2)
    One row per image: original | masked (visible patches only) | MAE | CrossMAE (the models given).
    Reconstructions show the predicted patches with the visible patches pasted back, as MAE's demo
    "reconstruction + visible". Both models see the SAME mask: the masking noise of image ``i`` is
    ``torch.rand(L, generator=seed + i)`` and goes through the official ``random_masking``; CrossMAE
    decodes every masked patch here (γ = p, ``--kept-mask-ratio`` to change; a CrossMAE query
    depends only on the visible tokens and its own position, so decoding a subset changes nothing).
    Checkpoints trained with ``norm_pix_loss`` predict per-patch normalised pixels; they are
    un-normalised with the mean and variance of the ground-truth target patch
    (``pred · sqrt(var + 1e-6) + mean``), exactly as MAE's visualisation does (the true statistics
    are not known to the model, so this shows structure, not the model's colour estimate).
``crossmae_block_contributions.png`` (paper Figure 5a-b, Appendix D)
    Per image two rows: the contribution of the mask token + position embedding and of each decoder
    block, then the running sum (reconstruction after block i). Appendix D's decomposition: with
    f_i = f_{i−1} + g_i(f_{i−1}) and the head h = decoder_pred ∘ decoder_norm, y = h(f_0) + Σ h(g_i).
    LayerNorm is affine except for its division by the standard deviation, so we freeze that at the
    final hidden state's σ(f_D): h_i(z) = W(γ ⊙ (z − mean z)/σ(f_D)), the constant terms (β, bias)
    go to f_0, and the contributions sum EXACTLY to the model's prediction (checked, see summary).
    Contributions are signed: shown around mid-grey, scaled by the largest magnitude of that image.
``crossmae_interblock_attention.png`` (paper Figure 5c)
    ``wfm.weights()``: decoder block (rows) × fused encoder feature map (columns: ``input`` when
    ``use_input``, then encoder blocks), diverging colour map.
``mae_attention_mass.png`` (paper Figure 1b)
    For each MAE decoder block, the softmax attention probability that mask-token queries put on
    the visible tokens (the cls token counted with them: it is an encoder output) vs on the mask
    tokens, averaged over heads, mask-token queries and images; per block the two sum to 1.
    The paper reports 1.42 vs 0.39 summed over 8 blocks; those numbers do not sum to 8, so the
    paper's "magnitude" is not this probability mass — we report the mass (and its sum over blocks)
    and say so (docs/visualize.md).
``summary.json``
    The numbers behind the figures (masses, inter-block weights, decomposition error, files).

Checkpoints: the official layout ``{'model': state_dict, 'args': Namespace(model=..., input_size=...,
decoder_depth=..., weight_fm=..., use_fm=..., use_input=..., norm_pix_loss=..., ...)}`` (also this
project's pretraining checkpoints), read with ``safe_torch_load``; or a bare state dict together with
``--model NAME --input-size N``. The model is rebuilt from ``args`` (missing fields are inferred from
the state dict's keys) and loaded STRICTLY. Every problem — unreadable file or image, a state dict
that does not match, a MAE checkpoint given to ``--crossmae`` — is a one-line ``UserError`` naming
the file, exit status 2, and nothing is written (all inputs are loaded before the first figure).
"""
from __future__ import annotations

import argparse
import io
import re
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

from .attention import record_attention
from .models import ARCHS, CrossMAE, MAE, create_model, parse_model_name, random_masking
from .utils import UserError, atomic_write_bytes, atomic_write_json, cli_entry, resolve_data_root, safe_torch_load
from .utils import atomic_write_figure, check_writable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG"}
PAD = 4            # pixels between panels
HEADER = 20        # pixels of the column-title strip of the PIL grids


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def _arg(args, name, default=None):
    if args is None:
        return default
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def build_from_checkpoint(path: str | Path, method: str, model_name: str | None = None,
                          input_size: int | None = None) -> tuple[MAE | CrossMAE, dict]:
    """Rebuild and strictly load a pretraining model from a checkpoint.

    Args:
        path: ``{'model': sd, 'args': Namespace|dict}`` or a bare state dict.
        method: ``"mae"`` or ``"crossmae"`` (the flag the file was given to).
        model_name, input_size: required for a bare state dict; override ``args`` otherwise.

    Returns:
        ``(model in eval mode, info)`` with info ``{"path", "model", "input_size", "norm_pix_loss",
        "mask_ratio", "kept_mask_ratio"}`` (ratios from ``args`` when present, else None).

    Raises:
        UserError: unreadable file, unknown layout, method mismatch, or a strict-load failure — one
            line naming ``path``.
    """
    path = Path(path)
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, args = obj["model"], obj.get("args")
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        sd, args = obj, None
    else:
        raise UserError(f"{path}: not a pretraining checkpoint (expected {{'model': state_dict, 'args': ...}} "
                        f"or a bare state dict)")
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    looks = "crossmae" if any(k.startswith("decoder_blocks.0.cross_attn.") for k in sd) else (
        "mae" if "decoder_embed.weight" in sd else None)
    if looks is None:
        raise UserError(f"{path}: no MAE or CrossMAE decoder weights in the state dict "
                        f"(an encoder-only / fine-tuned checkpoint cannot reconstruct)")
    if looks != method:
        raise UserError(f"{path}: this is a {looks.upper() if looks == 'mae' else 'CrossMAE'} checkpoint "
                        f"but was given to --{method}")
    name = model_name or _arg(args, "model")
    if name is None:
        raise UserError(f"{path}: a bare state dict needs --model NAME (e.g. {method}_vit_base_patch16) "
                        f"and --input-size N")
    name = str(name)
    arch = name.split("_", 1)[1] if name.startswith(("mae_", "crossmae_")) else name
    if arch not in ARCHS:
        raise UserError(f"{path}: unknown model {name!r} (architectures: {sorted(ARCHS)})")
    name = f"{method}_{arch}"  # official CrossMAE checkpoints say model='mae_vit_base_patch16'
    parse_model_name(name)
    size = input_size or _arg(args, "input_size")
    if size is None:
        raise UserError(f"{path}: the input size is unknown: pass --input-size N")
    kw: dict = {"img_size": int(size), "norm_pix_loss": bool(_arg(args, "norm_pix_loss", False))}
    depth = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"decoder_blocks\.(\d+)\.", k)] if m),
                    default=-1)
    kw["decoder_depth"] = int(_arg(args, "decoder_depth", None) or depth)
    if method == "crossmae":
        weight_fm = "wfm.linear.weight" in sd
        kw["weight_fm"] = weight_fm
        kw["self_attn"] = any(k.startswith("decoder_blocks.0.self_attn.") for k in sd)
        if weight_fm:
            k_maps = sd["wfm.linear.weight"].shape[1]
            enc_depth = ARCHS[arch].depth
            use_fm = _arg(args, "use_fm", None)
            use_input = _arg(args, "use_input", None)
            if use_fm is None:
                use_fm = [-1]
            if use_input is None:
                n_fm = enc_depth if list(use_fm) == [-1] else len(set(use_fm))
                use_input = k_maps == n_fm + 1
            kw["use_fm"], kw["use_input"] = list(use_fm), bool(use_input)
            kw["fm_mode"] = "lp" if "wfm.lp.0.weight" in sd else str(_arg(args, "fm_mode", "linear") or "linear")
    try:
        model = create_model(name, **kw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: cannot build {name} from the checkpoint's args: {exc}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{label} {len(keys)} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")
        raise UserError(f"{path}: state dict does not match {name} (input {size}, decoder depth "
                        f"{kw['decoder_depth']}): {'; '.join(parts) or str(exc).splitlines()[0]}")
    model.eval()
    info = {"path": str(path), "model": name, "input_size": int(size), "norm_pix_loss": kw["norm_pix_loss"],
            "mask_ratio": _arg(args, "mask_ratio"), "kept_mask_ratio": _arg(args, "kept_mask_ratio")}
    return model, info


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def list_images(paths: list[str] | None, data_root: str | None, num: int) -> list[Path]:
    """Image files: the given files / folders (recursive, sorted), else the first ``num`` of
    ``<data_root>/imagenet/train``. Raises UserError when none are found."""
    if paths:
        out: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                out += sorted(q for q in p.rglob("*") if q.suffix in IMAGE_EXTS or q.suffix.lower() in IMAGE_EXTS)
            elif p.is_file():
                out.append(p)
            else:
                raise UserError(f"{p}: image file or folder not found")
        src = ", ".join(paths)
    else:
        folder = resolve_data_root(data_root) / "imagenet" / "train"
        if not folder.is_dir():
            raise UserError(f"{folder}: default image folder not found (pass --images)")
        out = sorted(q for q in folder.rglob("*") if q.suffix.lower() in {e.lower() for e in IMAGE_EXTS})
        src = str(folder)
    if not out:
        raise UserError(f"{src}: no images found")
    return out[:num]


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB image → (3, size, size) float in [0, 1]: shorter side resized to ``size`` (bicubic),
    centre crop (torchvision). Raises CorruptImageError (a UserError) naming ``path`` when it cannot
    be decoded."""
    from torchvision import transforms
    from .data import load_rgb
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor()])
    return tf(load_rgb(str(path))).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (..., 3, H, W) → ImageNet-normalised (the models' training input)."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1]."""
    m = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)


def masking_noise(n: int, num_patches: int, seed: int) -> torch.Tensor:
    """(n, L) masking noise; row i from ``torch.Generator().manual_seed(seed + i)`` — the same mask
    for every model of the same patch grid."""
    return torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


# --------------------------------------------------------------------------------------------------
# model computations (pure, tested)
# --------------------------------------------------------------------------------------------------
def unnormalize_pred(model: MAE | CrossMAE, imgs: torch.Tensor, pred: torch.Tensor,
                     ids: torch.Tensor | None) -> torch.Tensor:
    """Predictions (N, M, p²·3) at patch ids (all patches when None) → the models' input space.

    With ``norm_pix_loss`` the target patch's own mean / variance are used (MAE visualisation):
    ``pred · sqrt(var + 1e-6) + mean``; otherwise ``pred`` unchanged.
    """
    if not model.norm_pix_loss:
        return pred
    target = model.patchify(imgs)
    if ids is not None:
        target = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def patch_std(model: MAE | CrossMAE, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(N, M, 1) per-patch target std ``sqrt(var + 1e-6)`` with norm_pix_loss, else ones."""
    if not model.norm_pix_loss:
        return torch.ones(ids.shape[0], ids.shape[1], 1)
    t = torch.gather(model.patchify(imgs), 1, ids.unsqueeze(-1).expand(-1, -1, model.patchify(imgs).shape[-1]))
    return (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5


@torch.no_grad()
def reconstruct(model: MAE | CrossMAE, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float,
                kept_mask_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``imgs`` (N, 3, H, W, normalised) with the given masking noise.

    Returns:
        ``(recon (N, 3, H, W) in the input space with visible patches pasted back, visible (N, L)
        bool)``. For CrossMAE, γ = ``kept_mask_ratio`` (default p: every masked patch decoded);
        patches neither visible nor decoded stay at the input value 0 (ImageNet mean colour).
    """
    L = model.num_patches
    if isinstance(model, CrossMAE):
        g = mask_ratio if kept_mask_ratio is None else kept_mask_ratio
        _, pred, _ = model(imgs, mask_ratio, g, noise=noise)
        m = random_masking(noise, mask_ratio, g)
        pred = unnormalize_pred(model, imgs, pred, m.ids_pred)
        full = torch.zeros(imgs.shape[0], L, pred.shape[-1])
        full.scatter_(1, m.ids_pred.unsqueeze(-1).expand_as(pred), pred)
    else:
        _, pred, _ = model(imgs, mask_ratio, noise=noise)
        m = random_masking(noise, mask_ratio, mask_ratio)
        full = unnormalize_pred(model, imgs, pred, None)
    visible = torch.zeros(imgs.shape[0], L, dtype=torch.bool)
    visible.scatter_(1, m.ids_keep, True)
    full = torch.where(visible.unsqueeze(-1), model.patchify(imgs), full)
    return model.unpatchify(full), visible


def masked_input(model: MAE | CrossMAE, imgs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``imgs`` with the non-visible patches set to 0 (ImageNet mean colour) — shown grey-ish."""
    x = model.patchify(imgs)
    return model.unpatchify(torch.where(visible.unsqueeze(-1), x, torch.zeros_like(x)))


@torch.no_grad()
def block_contributions(model: CrossMAE, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float,
                        kept_mask_ratio: float | None = None) -> dict:
    """Appendix D decomposition of CrossMAE's prediction into per-decoder-block terms.

    Returns dict:
        ``terms`` (D+1, N, M, p²·3): term 0 = mask token + pos embed (with the head's constants),
        term i = block i; ``sum(terms) == pred`` up to float error. In the model's target space.
        ``pred`` (N, M, p²·3) the model's prediction; ``ids_pred`` (N, M); ``max_abs_error`` float.
    """
    g = mask_ratio if kept_mask_ratio is None else kept_mask_ratio
    m = random_masking(noise, mask_ratio, g)
    y = model.encode(imgs, m)
    pred, inter = model.forward_decoder(y, m.ids_pred, return_intermediates=True)
    f = [model.queries(m.ids_pred)] + list(inter)
    ln, head = model.decoder_norm, model.decoder_pred
    fD = f[-1]
    sigma = (fD.var(dim=-1, unbiased=False, keepdim=True) + ln.eps).sqrt()

    def lin(z):  # the LayerNorm + Linear head without constants, σ frozen at σ(f_D)
        return ((z - z.mean(dim=-1, keepdim=True)) / sigma * ln.weight) @ head.weight.t()

    const = ln.bias @ head.weight.t() + head.bias
    terms = [lin(f[0]) + const] + [lin(f[i] - f[i - 1]) for i in range(1, len(f))]
    terms = torch.stack(terms)
    err = float((terms.sum(0) - pred).abs().max())
    return {"terms": terms, "pred": pred, "ids_pred": m.ids_pred, "max_abs_error": err}


@torch.no_grad()
def mae_attention_mass(model: MAE, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> dict:
    """Figure 1b: per decoder block, the attention probability mass of mask-token queries on visible
    tokens (cls included, also reported alone) vs on mask tokens.

    Probabilities come from ``record_attention`` (``last_attn`` (N, H, 1+L, 1+L), token 0 = cls,
    tokens 1.. in patch order after MAE's unshuffle). Each mass is averaged over heads, over the
    mask-token query rows and over images; per block ``visible + mask == 1``.

    Returns:
        ``{"visible": [D], "mask": [D], "cls": [D], "visible_sum", "mask_sum"}`` (floats).
    """
    m = random_masking(noise, mask_ratio, mask_ratio)
    record_attention(model, True)
    try:
        model(imgs, mask_ratio, noise=noise)
        probs = [blk.attn.last_attn for blk in model.decoder_blocks]
    finally:
        record_attention(model, False)
    tok_mask = torch.cat([torch.zeros(m.mask.shape[0], 1), m.mask], dim=1).bool()  # (N, 1+L), cls = visible
    vis, msk, cls = [], [], []
    for p in probs:
        p = p.float().mean(dim=1)                                   # (N, 1+L, 1+L), head average
        to_mask = (p * tok_mask[:, None, :]).sum(-1)                # (N, 1+L) mass on mask tokens
        to_vis = (p * (~tok_mask)[:, None, :]).sum(-1)
        to_cls = p[..., 0]
        rows = tok_mask.float()
        n_rows = rows.sum(1)
        per_img = lambda t: (t * rows).sum(1) / n_rows              # noqa: E731
        vis.append(float(per_img(to_vis).mean()))
        msk.append(float(per_img(to_mask).mean()))
        cls.append(float(per_img(to_cls).mean()))
    return {"visible": vis, "mask": msk, "cls": cls, "visible_sum": sum(vis), "mask_sum": sum(msk)}


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) uint8."""
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def grid_image(rows: list[list[np.ndarray]], titles: list[str], panel: int):
    """Compose panels (H=W=``panel``, uint8) into one PIL image with a title strip.

    Size: width ``ncols·panel + (ncols+1)·PAD``, height ``HEADER + nrows·panel + (nrows+1)·PAD``;
    panel (r, c) has its top-left corner at ``(PAD + c·(panel+PAD), HEADER + PAD + r·(panel+PAD))``.
    """
    from PIL import Image, ImageDraw
    ncols = max(len(r) for r in rows)
    W = ncols * panel + (ncols + 1) * PAD
    H = HEADER + len(rows) * panel + (len(rows) + 1) * PAD
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, t in enumerate(titles[:ncols]):
        draw.text((PAD + c * (panel + PAD) + 2, 4), t[: max(4, panel // 6)], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, arr in enumerate(row):
            canvas.paste(Image.fromarray(arr), (PAD + c * (panel + PAD), HEADER + PAD + r * (panel + PAD)))
    return canvas


def _write_png(save, path: Path) -> Path:
    buf = io.BytesIO()
    save(buf)
    data = buf.getvalue()
    return atomic_write_bytes(data, path)


def save_pil(img, path: Path) -> Path:
    return _write_png(lambda b: img.save(b, format="PNG"), path)


def save_fig(fig, path: Path) -> Path:
    return atomic_write_figure(fig, path, dpi=120, bbox_inches="tight")


def contribution_rows(model: CrossMAE, imgs: torch.Tensor, dec: dict) -> tuple[list[list[np.ndarray]], list[str]]:
    """Two panel rows per image from :func:`block_contributions`; columns ``tok+pos``, block 1..D.

    Row 1: term 0 (mask token + pos embed, with the head's constants) as an image, then each block's
    signed contribution around mid-grey (scaled by the image's largest block contribution; in pixel
    units after the target-std / ImageNet-std scaling). Row 2: the running sum after each block,
    un-normalised like a reconstruction, visible patches pasted back; its last panel is the model's
    reconstruction. Non-predicted patches are mid-grey in row 1.
    """
    terms, ids = dec["terms"], dec["ids_pred"]
    D1, N, M, P = terms.shape
    std = torch.tensor(IMAGENET_STD).repeat(P // 3)  # patch pixels are (row, col, channel)
    scale = patch_std(model, imgs, ids)                 # (N, M, 1) target std (norm_pix_loss), else 1
    patches = model.patchify(imgs)
    rows: list[list[np.ndarray]] = []
    for n in range(N):
        idx = ids[n].unsqueeze(-1).expand(-1, P)
        signed = terms[1:, n] * scale[n] * std          # (D, M, P) pixel-space contributions
        vmax = float(signed.abs().max()) or 1.0
        contrib, running = [], []
        acc = torch.zeros(M, P)
        for i in range(D1):
            acc = acc + terms[i, n]
            cur = unnormalize_pred(model, imgs[n:n + 1], acc.unsqueeze(0), ids[n:n + 1])[0]
            img = denormalize(model.unpatchify(patches[n].scatter(0, idx, cur).unsqueeze(0))[0])
            running.append(to_uint8(img))
            if i == 0:
                contrib.append(running[0])
            else:
                full = torch.full((model.num_patches, P), 0.5).scatter(0, idx, 0.5 + 0.5 * signed[i - 1] / vmax)
                contrib.append(to_uint8(model.unpatchify(full.unsqueeze(0))[0]))
        rows += [contrib, running]
    titles = ["tok+pos"] + [f"blk {i}" for i in range(1, D1)]
    return rows, titles


def interblock_figure(model: CrossMAE):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = model.wfm.weights().detach().float().numpy()
    labels = (["input"] if model.use_input else []) + [f"enc {i + 1}" for i in model.use_fm]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * w.shape[1], 1.0 + 0.4 * w.shape[0]))
    v = float(np.abs(w).max()) or 1.0
    im = ax.imshow(w, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax.set_xticks(range(w.shape[1]), labels, rotation=60, fontsize=7)
    ax.set_yticks(range(w.shape[0]), [f"dec {i + 1}" for i in range(w.shape[0])], fontsize=7)
    ax.set_xlabel("encoder feature map")
    ax.set_ylabel("decoder block")
    ax.set_title(f"inter-block attention weights ({model.fm_mode})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig, w


def mass_figure(mass: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    D = len(mass["visible"])
    x = np.arange(D)
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * D, 3))
    ax.bar(x - 0.2, mass["visible"], 0.4, label=f"to visible (+cls), Σ={mass['visible_sum']:.2f}")
    ax.bar(x + 0.2, mass["mask"], 0.4, label=f"to mask tokens, Σ={mass['mask_sum']:.2f}")
    ax.set_xticks(x, [str(i + 1) for i in x])
    ax.set_xlabel("MAE decoder block")
    ax.set_ylabel("attention mass of mask-token queries")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crossmae.visualize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mae", help="MAE pretraining checkpoint")
    p.add_argument("--crossmae", help="CrossMAE pretraining checkpoint")
    p.add_argument("--model", help="model name for a bare state dict (e.g. crossmae_vit_base_patch16)")
    p.add_argument("--input-size", type=int, help="image size for a bare state dict")
    p.add_argument("--images", nargs="+", help="image files or folders (default: <data-root>/imagenet/train)")
    p.add_argument("--data-root", help="datasets root (default $CROSSMAE_DATA_ROOT or ../shared/data)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=None, help="p (default: from the checkpoint, else 0.75)")
    p.add_argument("--kept-mask-ratio", type=float, default=None,
                   help="CrossMAE γ for the figures (default p: decode every masked patch)")
    p.add_argument("--seed", type=int, default=0, help="masking noise seed (image i uses seed + i)")
    p.add_argument("--output-dir", required=True)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    """Write the figures; returns the summary dict (also ``summary.json``)."""
    args = build_parser().parse_args(argv)
    check_writable(args.output_dir, "--output-dir", folder=True)  # before any work
    if not args.mae and not args.crossmae:
        raise UserError("nothing to visualise: give --mae CKPT and/or --crossmae CKPT")
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input-size {args.input_size}: expected a positive number of pixels")
    if args.num_images < 1:
        raise UserError(f"--num-images must be ≥ 1, got {args.num_images}")
    if args.model and args.mae and args.crossmae:
        raise UserError("--model applies to one bare state dict: give only --mae or only --crossmae with it")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: --output-dir exists and is not a folder")

    # ---- load everything first: no figure is written if any input is bad ----
    loaded: dict[str, SimpleNamespace] = {}
    for method in ("mae", "crossmae"):
        path = getattr(args, method)
        if path:
            model, info = build_from_checkpoint(path, method, args.model, args.input_size)
            loaded[method] = SimpleNamespace(model=model, info=info)
    models = [x.model for x in loaded.values()]
    if len({(m.img_size, m.patch_size) for m in models}) > 1:
        raise UserError(f"{args.mae} and {args.crossmae}: different input / patch sizes; the figure needs one mask")
    ref = models[0]
    p = args.mask_ratio
    if p is None:
        p = next((x.info["mask_ratio"] for x in loaded.values() if x.info["mask_ratio"]), 0.75)
    if not 0.0 < float(p) < 1.0:
        raise UserError(f"--mask-ratio must be in (0, 1), got {p}")
    p = float(p)
    g = args.kept_mask_ratio if args.kept_mask_ratio is not None else p
    if not 0.0 < g <= p + 1e-9:
        raise UserError(f"--kept-mask-ratio must satisfy 0 < γ ≤ p = {p}, got {g}")
    files = list_images(args.images, args.data_root, args.num_images)
    raw = torch.stack([load_image(f, ref.img_size) for f in files])          # (N, 3, H, W) in [0, 1]
    imgs = normalize(raw)
    noise = masking_noise(len(files), ref.num_patches, args.seed)

    # ---- compute ----
    summary: dict = {"images": [str(f) for f in files], "mask_ratio": p, "kept_mask_ratio_crossmae": g,
                     "seed": args.seed, "noise": "torch.rand(L, generator=manual_seed(seed + i)) per image",
                     "checkpoints": {k: v.info for k, v in loaded.items()},
                     "unnormalization": "norm_pix_loss predictions · sqrt(var+1e-6) + mean of the ground-truth "
                                        "patch (MAE visualisation)", "figures": {}}
    columns = [("original", [to_uint8(x) for x in raw])]
    visible = None
    recon = {}
    for method, x in loaded.items():
        r, visible = reconstruct(x.model, imgs, noise, p, g if method == "crossmae" else None)
        recon[method] = [to_uint8(denormalize(t)) for t in r]
    columns.append(("masked", [to_uint8(denormalize(t)) for t in masked_input(ref, imgs, visible)]))
    columns += [("MAE" if k == "mae" else "CrossMAE", v) for k, v in recon.items()]
    figures = [("reconstructions.png",
                grid_image([[c[1][i] for c in columns] for i in range(len(files))], [c[0] for c in columns],
                           ref.img_size))]
    if "crossmae" in loaded:
        cm = loaded["crossmae"].model
        dec = block_contributions(cm, imgs, noise, p, g)
        rows, titles = contribution_rows(cm, imgs, dec)
        figures.append(("crossmae_block_contributions.png", grid_image(rows, titles, cm.img_size)))
        summary["block_decomposition_max_abs_error"] = dec["max_abs_error"]
        if cm.weight_fm:
            fig, w = interblock_figure(cm)
            figures.append(("crossmae_interblock_attention.png", fig))
            summary["interblock_weights"] = w.tolist()
            summary["interblock_columns"] = (["input"] if cm.use_input else []) + [f"enc{i + 1}" for i in cm.use_fm]
    if "mae" in loaded:
        mass = mae_attention_mass(loaded["mae"].model, imgs, noise, p)
        summary["mae_attention_mass"] = mass
        figures.append(("mae_attention_mass.png", mass_figure(mass)))

    # ---- write ----
    for name, fig in figures:
        path = out_dir / name
        if hasattr(fig, "savefig"):
            save_fig(fig, path)
        else:
            save_pil(fig, path)
        summary["figures"][name] = str(path)
        print(f"wrote {path}")
    atomic_write_json(summary, out_dir / "summary.json")
    print(f"wrote {out_dir / 'summary.json'}")
    if "mae_attention_mass" in summary:
        m = summary["mae_attention_mass"]
        print(f"MAE decoder attention mass of mask tokens, summed over {len(m['visible'])} blocks: "
              f"to visible {m['visible_sum']:.2f} vs to mask tokens {m['mask_sum']:.2f} "
              f"(paper Fig. 1b, ViT-B/ImageNet val: 1.42 vs 0.39 — a different normalisation, see docs)")
    return summary


if __name__ == "__main__":
    main()
