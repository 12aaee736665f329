"""Backbone API: any MAE / CrossMAE / timm ViT checkpoint in, a ViT backbone out, with a strict report.

Every transfer task loads its backbone through this module, so that no task ever starts from a
silently partial load (REFERENCE.md §7: detectron2 skips shape mismatches with a warning, mmseg
loads non-strictly and a wrong prefix loads nothing).

Formats recognised (``LoadReport.format``):
    ``mae_pretrain``       official MAE pretraining checkpoint (``{'model', 'optimizer', 'epoch',
                           'scaler', 'args'}``, decoder with ``decoder_embed`` and self-attention).
    ``crossmae_pretrain``  official CrossMAE pretraining checkpoint (cross-attention decoder; no
                           final encoder ``norm`` when inter-block attention is on). Our own
                           ``crossmae.pretrain`` writes both of these layouts.
    ``mae_encoder``        the official MAE pretrained release (``mae_pretrain_vit_*.pth``:
                           ``{'model': encoder}`` with the final ``norm``, no decoder, no head, no args).
    ``mae_finetune``       a fine-tuned checkpoint of MAE's / CrossMAE's ``main_finetune.py``
                           (``{'model': …}`` with ``head`` and ``fc_norm`` or ``norm``); MAE and CrossMAE
                           encoders are identical, so the method is not in the file (a zoo entry gives it).
    ``timm``               a bare timm ``VisionTransformer`` state dict (``.pth`` or ``.safetensors``).
    ``project_encoder``    an encoder exported by :func:`export_encoder` (``{'model', 'meta'}``).

Command line::

    python -m crossmae.backbone inspect CKPT [--arch vit_base_patch16] [--img-size 224]
    python -m crossmae.backbone export CKPT OUT.pth [--arch ...]

``CKPT`` (like every ``--backbone``) is a path or a URI (``zoo:NAME``, ``hf://…``, ``timm:…``,
``http(s)://…``) resolved by :func:`crossmae.zoo.resolve_backbone`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .models import ARCHS, get_arch
from .utils import UserError, atomic_save, atomic_write_bytes, check_writable, cli_entry, safe_torch_load_hashed

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.", "head.")
DECODER_PREFIXES = ("decoder_", "mask_token", "dec_norms.", "wfm.")
#: The 12 tensors of one encoder block (timm / MAE names).
BLOCK_KEYS = tuple(f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                   for p in ("weight", "bias"))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class BackboneLoadError(UserError):
    """A checkpoint that cannot become the requested backbone. One line: ``<file>: <reason>``."""


@dataclass
class LoadReport:
    """What a backbone load did, key by key.

    Attributes:
        path: the checkpoint file. sha256: its SHA-256. format: see the module docstring.
        arch: the architecture name (``vit_base_patch16`` …). has_final_norm: the checkpoint has
            the encoder's final ``norm`` (MAE yes; CrossMAE with inter-block attention no).
        loaded: keys copied into the target model. missing: target keys left at their
            initialisation (only ever ones the caller allowed, e.g. a new head). unexpected:
            checkpoint encoder keys the target has no place for (only ever allowed ones).
        ignored: checkpoint keys deliberately not used (the pretraining decoder, MAE's ``norm``
            when the task pools with ``fc_norm``, the cls token for ViTDet …).
        pos_embed_resized: ``(old_grid, new_grid)`` (each (h, w)) when the position embedding was
            bicubically interpolated, else None.
        patch_embed_resized: ``(old_patch, new_patch)`` when the patch-embedding kernel was resampled
            to another patch size (ViTDet-H's p14→p16), else None.
        meta: pretraining facts read from the checkpoint's ``args`` (method, mask ratio, prediction
            ratio, decoder depth, epochs …) where present. When the file cannot tell the method (a
            fine-tuned checkpoint) and a zoo entry can, ``method`` is the entry's and
            ``method_from`` is ``"zoo"``.
        source: the ``--backbone`` value as given (a path, ``zoo:NAME``, ``hf://…`` …).
        zoo: the registry entry (``crossmae.zoo.ZooEntry.to_dict()``: ``reported_ft_top1`` …) when
            ``source`` names a released checkpoint, else None.
    """
    path: str
    sha256: str
    format: str
    arch: str
    has_final_norm: bool
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    pos_embed_resized: tuple | None = None
    patch_embed_resized: tuple | None = None
    target: str = ""
    meta: dict = field(default_factory=dict)
    source: str = ""
    zoo: dict | None = None

    def summary(self) -> str:
        """A few human-readable lines for logs."""
        lines = [f"backbone {self.path} (sha256 {self.sha256[:12]}…): format {self.format}, arch {self.arch}, "
                 f"final norm {'yes' if self.has_final_norm else 'no'}"]
        if self.source and self.source != self.path:
            lines.append(f"  from --backbone {self.source}" + (
                f" (zoo {self.zoo['name']}: {self.zoo['method']}, reported ImageNet fine-tune top-1 "
                f"{self.zoo['reported_ft_top1']})" if self.zoo else ""))
        if self.target:
            lines.append(f"  into {self.target}: loaded {len(self.loaded)} tensors, missing {len(self.missing)}"
                         f"{' ' + _short(self.missing) if self.missing else ''}, unexpected {len(self.unexpected)}"
                         f"{' ' + _short(self.unexpected) if self.unexpected else ''}")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} checkpoint keys: {_short(_group(self.ignored))}")
        if self.pos_embed_resized:
            (a, b), (c, d) = self.pos_embed_resized
            lines.append(f"  pos_embed resized (bicubic) from a {a}x{b} to a {c}x{d} grid")
        if self.patch_embed_resized:
            lines.append(f"  patch_embed resampled from {self.patch_embed_resized[0]}px to "
                         f"{self.patch_embed_resized[1]}px patches (timm resample_patch_embed)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict (for metrics files)."""
        d = asdict(self)
        d["n_loaded"], d["n_missing"], d["n_unexpected"], d["n_ignored"] = (
            len(self.loaded), len(self.missing), len(self.unexpected), len(self.ignored))
        return d


def _short(keys: Iterable[str], n: int = 6) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:n]) + (f", … +{len(keys) - n}" if len(keys) > n else "") + "]"


def _group(keys: Iterable[str]) -> list[str]:
    """Collapse ``decoder_blocks.3.mlp.fc1.weight`` etc. into ``decoder_blocks.*`` for display."""
    out: list[str] = []
    for k in keys:
        g = re.sub(r"\.\d+\..*$", ".*", k)
        if g not in out:
            out.append(g)
    return out


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _read_raw(path: Path) -> tuple[dict, dict | None, object, str, str]:
    """(state_dict, container-or-None, args, container kind, sha256) from a file; safe loading only.

    The file's bytes are read once (:func:`crossmae.utils.safe_torch_load_hashed`): the sha256 is that
    of exactly the bytes loaded, and a cached download whose bytes differ from its pin is refused
    (:func:`crossmae.zoo.check_loaded_sha256`)."""
    from .zoo import check_loaded_sha256, resolve_backbone
    try:
        path = resolve_backbone(path)
    except UserError as exc:
        raise BackboneLoadError(str(exc)) from None
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise BackboneLoadError(f"{path}: checkpoint file not found")
        from .safeio import read_hashed
        try:
            data, sha = read_hashed(path.resolve())
        except UserError as exc:
            raise BackboneLoadError(str(exc)) from None
        _check_pin(check_loaded_sha256, path, sha)
        try:
            from safetensors.torch import load as load_safetensors
            return load_safetensors(data), None, None, "bare", sha
        except Exception as exc:
            raise BackboneLoadError(f"{path}: not a readable safetensors file: {str(exc).splitlines()[0]}")
    try:
        obj, sha = safe_torch_load_hashed(path, verify=check_loaded_sha256)  # pin checked before unpickling
    except UserError as exc:
        raise BackboneLoadError(str(exc)) from None
    if not isinstance(obj, dict):
        raise BackboneLoadError(f"{path}: not a ViT checkpoint (holds a {type(obj).__name__}, not a dict)")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], obj, obj.get("args"), key, sha
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, None, "bare", sha
    raise BackboneLoadError(f"{path}: not a ViT checkpoint (no 'model' or 'state_dict' entry and not a "
                            f"state dict; top-level keys {_short(obj.keys())})")


def _check_pin(check, path: Path, sha: str) -> None:
    try:
        check(path, sha)
    except UserError as exc:
        raise BackboneLoadError(str(exc)) from None


def _strip_wrappers(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _detect_format(sd: dict, container: dict | None) -> str:
    if container is not None and isinstance(container.get("meta"), dict) \
            and container["meta"].get("format") == "project_encoder":
        return "project_encoder"
    if any(k.startswith("decoder_blocks.") for k in sd):
        a = _args_dict(container.get("args") if container is not None else None)
        if "cross_mae" in a:  # the official CrossMAE main_pretrain.py flag (MAE runs of that repo: False)
            return "crossmae_pretrain" if a["cross_mae"] else "mae_pretrain"
        return "crossmae_pretrain" if any(".cross_attn." in k for k in sd) else "mae_pretrain"
    if container is not None and ("head.weight" in sd or "fc_norm.weight" in sd):
        return "mae_finetune"
    if container is not None and isinstance(container.get("model"), dict) and "norm.weight" in sd \
            and not any(k.startswith(DECODER_PREFIXES) for k in sd):
        return "mae_encoder"  # mae_pretrain_vit_*.pth: {'model': encoder}
    return "timm"


def _args_dict(args) -> dict:
    return vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})


def _args_meta(args, container: dict | None, fmt: str) -> dict:
    meta: dict = {}
    if container is not None and isinstance(container.get("meta"), dict):
        meta.update(container["meta"])
    if args is not None:
        a = _args_dict(args)
        for k in ("model", "input_size", "mask_ratio", "kept_mask_ratio", "decoder_depth", "decoder_embed_dim",
                  "epochs", "weight_fm", "use_fm", "use_input", "norm_pix_loss", "blr", "batch_size", "cross_mae"):
            if k in a:
                meta[k] = a[k]
        if container is not None and "epoch" in container:
            meta["epoch"] = container["epoch"]
    if "method" not in meta:
        meta["method"] = {"mae_pretrain": "mae", "crossmae_pretrain": "crossmae",
                          "mae_encoder": "mae"}.get(fmt, meta.get("method"))
    if meta.get("method") == "mae" and "mask_ratio" in meta and meta.get("kept_mask_ratio") is None:
        meta["kept_mask_ratio"] = meta["mask_ratio"]
    return meta


def _infer_arch(path: Path, sd: dict, arch: str | None) -> tuple[str, int, int, int]:
    """(arch name, patch size, width, depth) checked against the checkpoint's tensors."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or not any(k.startswith("blocks.") for k in sd):
        raise BackboneLoadError(f"{path}: not a ViT checkpoint (no patch_embed.proj.weight / blocks.* keys; "
                                f"keys look like {_short(sorted(sd))})")
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise BackboneLoadError(f"{path}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    width, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if arch is None:
        found = [n for n, a in ARCHS.items() if (a.patch_size, a.embed_dim, a.depth) == (patch, width, depth)]
        if not found:
            raise BackboneLoadError(f"{path}: no known architecture has patch {patch}, width {width}, depth {depth} "
                                    f"(known: {sorted(ARCHS)}); pass arch=")
        return found[0], patch, width, depth
    try:
        a = get_arch(arch)
    except ValueError as exc:
        raise BackboneLoadError(f"{path}: {exc}") from None
    if a.patch_size != patch:
        raise BackboneLoadError(f"{path}: patch size {patch} does not match {arch} (patch {a.patch_size})")
    if a.embed_dim != width:
        raise BackboneLoadError(f"{path}: width {width} does not match {arch} (width {a.embed_dim})")
    if depth < a.depth:
        raise BackboneLoadError(f"{path}: missing encoder blocks: the checkpoint has {depth} blocks, {arch} needs "
                                f"{a.depth}")
    if depth > a.depth:
        raise BackboneLoadError(f"{path}: the checkpoint has {depth} encoder blocks, {arch} has {a.depth}")
    return arch, patch, width, a.depth


def expected_encoder_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The shape of every fixed-size encoder tensor of ``arch`` under timm names.

    ``cls_token`` (1, 1, D), ``patch_embed.proj.weight`` (D, 3, p, p) and bias (D,), and per block
    ``norm1``/``norm2`` (D,), ``attn.qkv`` (3D, D) + (3D,), ``attn.proj`` (D, D) + (D,), ``mlp.fc1``
    (4D, D) + (4D,), ``mlp.fc2`` (D, 4D) + (D,) (timm ``VisionTransformer`` with mlp_ratio 4, as MAE's
    ``models_vit.py``), and the optional ``norm`` / ``fc_norm`` (D,). ``pos_embed`` (its grid) and
    ``head`` (its class count) are checked by the caller.
    """
    a = get_arch(arch)
    d, h, p = a.embed_dim, 4 * a.embed_dim, a.patch_size
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
             "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
    out = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
           "norm.weight": (d,), "norm.bias": (d,), "fc_norm.weight": (d,), "fc_norm.bias": (d,)}
    for i in range(a.depth):
        out.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    return out


def check_encoder_tensors(path: str | Path, enc: dict[str, torch.Tensor], arch: str) -> None:
    """Refuse what would otherwise be cast or loaded silently: a non-floating-point tensor (integer or
    bool weights), and any tensor whose shape differs from ``arch``'s (:func:`expected_encoder_shapes`;
    ``head`` must be (C, D) + (C,)).

    Raises:
        BackboneLoadError: one line naming the key and its dtype, or its shape and the expected shape.
    """
    for k, v in enc.items():
        if not torch.is_floating_point(v):
            raise BackboneLoadError(f"{path}: {k} has dtype {str(v.dtype).replace('torch.', '')}; "
                                    f"expected floating-point weights")
    expected = expected_encoder_shapes(arch)
    d = expected["cls_token"][-1]
    if "head.weight" in enc:
        c = enc["head.weight"].shape[0] if enc["head.weight"].ndim == 2 else "C"
        expected.update({"head.weight": (c, d), "head.bias": (c,)})
    for k, v in enc.items():
        want = expected.get(k)
        if want is not None and tuple(v.shape) != want:
            shown = "(" + ", ".join(map(str, want)) + ("," if len(want) == 1 else "") + ")"
            raise BackboneLoadError(f"{path}: {k} has shape {tuple(v.shape)}, expected {shown} for {arch}")


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bicubically interpolate a ViT position embedding to a new patch grid.

    As MAE ``util/pos_embed.interpolate_pos_embed`` and detectron2 ``get_abs_pos``
    (``F.interpolate(mode='bicubic', align_corners=False)``, no antialiasing, on the patch part;
    prefix rows such as the cls token are kept), through timm's ``resample_abs_pos_embed``.

    Args:
        pos_embed: (1, num_prefix + h·w, D) with a square old grid.
        new_grid: (H, W) target grid.

    Returns:
        (1, num_prefix + H·W, D) in the input dtype.

    Raises:
        ValueError: the old patch count is not a square.
    """
    from timm.layers import resample_abs_pos_embed
    n = pos_embed.shape[1] - num_prefix
    old = int(round(n ** 0.5))
    if old * old != n:
        raise ValueError(f"position embedding has {n} patch rows, not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(new_grid), old_size=[old, old], num_prefix_tokens=num_prefix,
                                  interpolation="bicubic", antialias=False)


def load_encoder_state_dict(path: str | Path, *, arch: str | None = None, img_size: int | tuple[int, int] | None = None,
                            keep_cls_token: bool = True, patch_size: int | None = None
                            ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read the ENCODER of any known checkpoint, under timm names.

    Args:
        path: checkpoint file (``.pth`` / ``.pt`` / ``.safetensors``) or a URI (``zoo:NAME``,
            ``hf://…``, ``timm:…``, ``http(s)://…``; downloaded once by :mod:`crossmae.zoo`).
        arch: expected architecture (``vit_base_patch16`` …); None infers it from the tensors.
        img_size: target input size in pixels (int or (H, W)); ``pos_embed`` is resized to its grid.
        keep_cls_token: False drops ``cls_token`` and the cls row of ``pos_embed`` (ViTDet).
        patch_size: target patch size when it differs from the checkpoint's: the patch-embedding
            kernel is resampled with timm's ``resample_patch_embed`` (FlexiViT pseudo-inverse resize)
            and ``img_size`` is divided by the new size (detectron2 ViTDet-H runs MAE ViT-H/14 at p16).

    Returns:
        ``(state_dict, report)``; state_dict holds ``cls_token`` (1,1,D), ``pos_embed`` (1,1+N,D)
        (or (1,N,D) without cls), ``patch_embed.proj.*``, ``blocks.{i}.*`` and, when present in the
        checkpoint, ``norm.*``, ``fc_norm.*``, ``head.*``. The report's ``loaded`` lists these keys.

    Raises:
        BackboneLoadError: missing / empty / truncated file, a pickle needing other globals, not a ViT
            checkpoint, patch size / width / depth not matching ``arch``, missing block tensors,
            unknown non-decoder keys, non-finite weights, ``img_size`` not divisible by the patch size.
    """
    from . import zoo
    source = str(path)
    try:
        path = zoo.resolve_backbone(path)
    except UserError as exc:
        raise BackboneLoadError(str(exc)) from None
    entry = zoo.zoo_entry(source)
    check_img_size(img_size, f"{path}: image size")
    sd, container, args, _, sha = _read_raw(path)
    sd = _strip_wrappers(sd)
    fmt = _detect_format(sd, container)
    arch, patch, width, depth = _infer_arch(path, sd, arch)

    enc, ignored, unknown = {}, [], []
    for k, v in sd.items():
        if k.startswith(ENCODER_PREFIXES) and not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth):
            enc[k] = v
        elif k.startswith(DECODER_PREFIXES):
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise BackboneLoadError(f"{path}: unexpected keys for a {arch} encoder: {_short(sorted(unknown))}")
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"] + \
           [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    absent = [k for k in need if k not in enc]
    if absent:
        raise BackboneLoadError(f"{path}: missing encoder tensors {_short(absent)} ({len(absent)} in all)")
    check_encoder_tensors(path, enc, arch)
    for k, v in enc.items():
        if not torch.isfinite(v).all():
            raise BackboneLoadError(f"{path}: non-finite values (nan/inf) in {k}")
    pe = enc["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[-1] != width:
        raise BackboneLoadError(f"{path}: pos_embed has shape {tuple(pe.shape)}, expected (1, 1+N, {width})")
    n_patch = pe.shape[1] - 1
    old = int(round(n_patch ** 0.5))
    if old * old != n_patch:
        raise BackboneLoadError(f"{path}: pos_embed has {n_patch} patch rows, not a square grid")
    resized = patch_resized = None
    if patch_size is not None and patch_size != patch:
        from timm.layers import resample_patch_embed
        w = enc["patch_embed.proj.weight"]
        enc["patch_embed.proj.weight"] = resample_patch_embed(w.float(), [patch_size, patch_size]).to(w.dtype)
        patch_resized, patch = (patch, patch_size), patch_size
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if hw[0] % patch or hw[1] % patch:
            raise BackboneLoadError(f"{path}: image size {hw} is not divisible by the patch size {patch}")
        new = (hw[0] // patch, hw[1] // patch)
        if new != (old, old):
            enc["pos_embed"] = resize_pos_embed(pe, new)
            resized = ((old, old), new)
    if not keep_cls_token:
        enc.pop("cls_token")
        enc["pos_embed"] = enc["pos_embed"][:, 1:]
        ignored += ["cls_token", "pos_embed[cls row]"]
    meta = _args_meta(args, container, fmt)
    if meta.get("method") is None and entry is not None:
        meta.update(method=entry["method"], method_from="zoo")
    report = LoadReport(path=str(path), sha256=sha, format=fmt, arch=arch,
                        has_final_norm="norm.weight" in enc, loaded=sorted(enc), ignored=ignored,
                        pos_embed_resized=resized, patch_embed_resized=patch_resized,
                        meta=meta, source=source, zoo=entry)
    return enc, report


# --------------------------------------------------------------------------------------------------
# loading into a model
# --------------------------------------------------------------------------------------------------
def load_into(model: nn.Module, sd: dict[str, torch.Tensor], report: LoadReport, *,
              key_map: Callable[[str], str | None] | None = None, allowed_missing: Iterable[str] = (),
              allowed_unexpected: Iterable[str] = ()) -> LoadReport:
    """Load an encoder state dict into a task backbone, strictly accounted.

    Args:
        model: the target module. sd: from :func:`load_encoder_state_dict`. report: its report,
            updated in place (``loaded``, ``missing``, ``unexpected``, ``ignored``, ``target``).
        key_map: old name → new name, or None to drop a key on purpose (recorded as ignored).
        allowed_missing: regexes (full match) of target keys that may stay at their init (a new head,
            zero-init relative position tables …).
        allowed_unexpected: regexes of mapped checkpoint keys the target may lack (recorded).

    Returns:
        the report.

    Raises:
        BackboneLoadError: a shape differs, or a missing / unexpected key is not allowed. Nothing is
            copied into ``model`` in that case.
    """
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = key_map(k) if key_map is not None else k
        if nk is None:
            report.ignored.append(k)
        else:
            mapped[nk] = v
    target = model.state_dict()
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
                 if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if bad_shape:
        raise BackboneLoadError(f"{report.path}: shape mismatch for {type(model).__name__}: {_short(bad_shape, 3)}")
    am = [re.compile(p) for p in allowed_missing]
    au = [re.compile(p) for p in allowed_unexpected]
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in mapped if k not in target]
    bad_missing = [k for k in missing if not any(p.fullmatch(k) for p in am)]
    bad_unexpected = [k for k in unexpected if not any(p.fullmatch(k) for p in au)]
    if bad_missing:
        raise BackboneLoadError(f"{report.path}: {len(bad_missing)} {type(model).__name__} weights would stay "
                                f"randomly initialised: {_short(bad_missing)}")
    if bad_unexpected:
        raise BackboneLoadError(f"{report.path}: {len(bad_unexpected)} checkpoint weights have no place in "
                                f"{type(model).__name__}: {_short(bad_unexpected)}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in target}, strict=False)
    report.loaded = sorted(k for k in mapped if k in target)
    report.missing = sorted(missing)
    report.unexpected = sorted(unexpected)
    report.target = type(model).__name__
    return report


def load_backbone(path: str | Path, arch: str | None = None, img_size: int = 224, num_classes: int = 0,
                  global_pool: str = "token", drop_path_rate: float = 0.0, **timm_kwargs
                  ) -> tuple[nn.Module, LoadReport]:
    """A timm ``VisionTransformer`` with the checkpoint's encoder loaded, and the load report.

    The final-norm handling follows MAE: with ``global_pool='avg'`` the model pools patch tokens and
    applies a new ``fc_norm`` (MAE fine-tuning); the checkpoint's ``norm`` is then ignored (reported).
    With ``global_pool='token'`` the model keeps ``norm`` when the checkpoint has one; a CrossMAE
    checkpoint without it gives a model without final norm (``final_norm=False``), never a random one.

    Args:
        path: checkpoint. arch: expected architecture or None to infer. img_size: input size (px);
            ``pos_embed`` is resized when its grid differs. num_classes: head size (0 = no head).
        global_pool: ``'token'`` (cls token) or ``'avg'``. drop_path_rate: stochastic depth.
        timm_kwargs: passed to ``VisionTransformer`` (e.g. ``drop_rate``).

    Returns:
        ``(model, report)``. Allowed to stay at init: ``head.*`` (unless the checkpoint has a head of
        the same size) and ``fc_norm.*`` (unless the checkpoint has one).

    Raises:
        BackboneLoadError: see :func:`load_encoder_state_dict` and :func:`load_into`.
    """
    from timm.models.vision_transformer import VisionTransformer

    if global_pool not in ("token", "avg"):
        raise BackboneLoadError(f"{path}: global_pool must be 'token' or 'avg', got {global_pool!r}")
    sd, report = load_encoder_state_dict(path, arch=arch, img_size=img_size)
    a = ARCHS[report.arch]
    use_fc_norm = global_pool == "avg"
    final_norm = report.has_final_norm and not use_fc_norm
    # timm builds ``fc_norm`` only when final_norm=True and fc_norm=True (then ``norm`` is Identity)
    model = VisionTransformer(img_size=img_size, patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth,
                              num_heads=a.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes,
                              global_pool=global_pool, fc_norm=use_fc_norm, final_norm=final_norm or use_fc_norm,
                              drop_path_rate=drop_path_rate, norm_layer=_ln_eps6(), **timm_kwargs)
    drop = set()
    if not final_norm:
        drop |= {"norm.weight", "norm.bias"}
    if not use_fc_norm:
        drop |= {"fc_norm.weight", "fc_norm.bias"}
    head = sd.get("head.weight")
    if num_classes == 0 or head is None or head.shape[0] != num_classes:
        drop |= {"head.weight", "head.bias"}
    report = load_into(model, sd, report, key_map=lambda k: None if k in drop else k,
                       allowed_missing=[r"head\..*", r"fc_norm\..*"])
    return model, report


def _ln_eps6():
    from functools import partial
    return partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def export_encoder(path: str | Path, out: str | Path, arch: str | None = None) -> LoadReport:
    """Write the encoder of ``path`` as a timm-loadable checkpoint ``{'model': encoder, 'meta': …}``.

    ``timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=out))`` loads it with no missing encoder key; for a checkpoint
    without final norm (CrossMAE) pass ``final_norm=False`` too (see ``meta['has_final_norm']``).
    Decoder weights are dropped. ``.safetensors`` output writes the bare state dict.

    Raises:
        BackboneLoadError: see :func:`load_encoder_state_dict`.
    """
    check_output_file(out)
    sd, report = load_encoder_state_dict(path, arch=arch)
    sd = {k: v.contiguous() for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    meta = dict(report.meta, format="project_encoder", arch=report.arch, source=str(path),
                source_sha256=report.sha256, source_format=report.format, has_final_norm=report.has_final_norm)
    out = Path(out)
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save
            atomic_write_bytes(save(sd, metadata={k: str(v) for k, v in meta.items()}), out)
        else:
            atomic_save({"model": sd, "meta": meta}, out)
    except OSError as exc:
        raise BackboneLoadError(f"{out}: cannot write the exported encoder ({exc.strerror or type(exc).__name__})") \
            from None
    return report


def check_img_size(img_size, what: str = "--img-size") -> None:
    """Refuse an image size (int or (H, W), pixels) that is not a positive integer.

    Raises:
        UserError: one line ``<what> <value>: expected a positive number of pixels``.
    """
    if img_size is None:
        return
    hw = (img_size, img_size) if not isinstance(img_size, (tuple, list)) else tuple(img_size)
    if len(hw) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in hw):
        raise BackboneLoadError(f"{what} {img_size}: expected a positive number of pixels")


def check_output_file(out: str | Path) -> None:
    """Refuse an export path that cannot be written, before any work
    (:func:`crossmae.utils.check_writable`; a folder gets a hint to name the file).

    Raises:
        BackboneLoadError: one line naming the path and the problem.
    """
    out = Path(out)
    if out.is_dir():
        raise BackboneLoadError(f"{out}: is a folder; give the exported encoder's file name (e.g. {out / 'encoder.pth'})")
    try:
        check_writable(out, "export target", folder=False)
    except UserError as exc:
        raise BackboneLoadError(str(exc)) from None
    run_dir = _run_folder_of(out)
    if run_dir is not None:
        raise BackboneLoadError(f"{out}: export target lies in run folder {run_dir} (it holds "
                                f"{', '.join(n for n in RUN_FOLDER_MARKERS if os.path.lexists(run_dir / n))}); an "
                                f"export never writes into a run's folder: choose another path")


#: Files that make a folder a run's (or a suite task's) folder: an export never writes there.
RUN_FOLDER_MARKERS = ("run.json", "run.lock", "metrics.json", "task.json", "task_state.json")


def _run_folder_of(out: Path) -> Path | None:
    """The run folder ``out`` would be written into, at any depth (a folder above it holds a
    :data:`RUN_FOLDER_MARKERS` file), else None."""
    for folder in out.expanduser().absolute().parents:
        if any(os.path.lexists(folder / n) for n in RUN_FOLDER_MARKERS):
            return folder
    return None


@cli_entry
def main(argv: list[str] | None = None) -> LoadReport:
    """``inspect`` prints a checkpoint's load report; ``export`` writes its encoder for timm."""
    p = argparse.ArgumentParser(prog="python -m crossmae.backbone", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="print what a checkpoint holds and how it would load")
    pi.add_argument("checkpoint")
    pi.add_argument("--arch", default=None, choices=sorted(ARCHS))
    pi.add_argument("--img-size", type=int, default=None)
    pe = sub.add_parser("export", help="write the encoder as a timm-loadable checkpoint")
    pe.add_argument("checkpoint")
    pe.add_argument("out")
    pe.add_argument("--arch", default=None, choices=sorted(ARCHS))
    args = p.parse_args(argv)
    if args.cmd == "inspect":
        check_img_size(args.img_size)
        _, report = load_encoder_state_dict(args.checkpoint, arch=args.arch, img_size=args.img_size)
        print(report.summary())
        if report.meta:
            print("  pretraining: " + ", ".join(f"{k}={v}" for k, v in report.meta.items()))
    else:
        report = export_encoder(args.checkpoint, args.out, arch=args.arch)
        print(report.summary())
        print(f"encoder written to {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
