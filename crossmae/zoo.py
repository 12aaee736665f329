"""Where a ``--backbone`` value points: the one place every command resolves it, and the registry of
released MAE / CrossMAE checkpoints.

``resolve_backbone(spec)`` turns the value of ``--backbone`` into a local checkpoint file:

    ``PATH``                              a local ``.pth`` / ``.pt`` / ``.safetensors`` file
    ``zoo:NAME``                          a released checkpoint of :data:`REGISTRY` (``python -m crossmae.zoo list``)
    ``hf://OWNER/REPO/PATH[@REVISION]``   a file on the Hugging Face Hub (``huggingface_hub.hf_hub_download``)
    ``timm:MODEL.TAG``                    timm's own pretrained weights (e.g. ``timm:vit_base_patch16_224.mae``),
                                          located through ``timm.models.get_pretrained_cfg`` (its ``hf_hub_id``,
                                          else its ``url``)
    ``http(s)://…``                       any URL (a ``https://huggingface.co/OWNER/REPO/resolve/REV/PATH``
                                          link is treated as ``hf://OWNER/REPO/PATH@REV``)

Remote files are downloaded once into one cache, ``$CROSSMAE_CACHE`` (default ``~/.cache/crossmae``):
``hf/<owner>/<repo>/<revision>/<path>`` for Hub files, ``url/<host>/<path>`` for URLs (a registry
entry is cached where its own URI is, so ``zoo:NAME`` and that URI share one file). A download goes
to a hidden temporary file next to its destination, is checked (size against the server's
``Content-Length`` / the Hub's size, SHA-256 against the registry's expected value or the Hub's LFS
ETag, readability as a checkpoint) and only then moved into place with ``os.replace``; a refused or
interrupted download leaves nothing in the cache. The SHA-256 of every cached file is pinned in a
``<file>.sha256.json`` sidecar at first download (trust on first use): a later file at the same place
whose size or SHA-256 differs is refused. A cached file is used without any network access; with
``HF_HUB_OFFLINE=1`` (or no network) an uncached one is an error naming the URL and the path to put
the file at.

``$CROSSMAE_ZOO_MIRROR`` (a URL prefix, e.g. ``http://127.0.0.1:8000``) replaces the scheme and host
of the registry's plain-URL entries (the MAE releases); ``$HF_ENDPOINT`` is the Hub endpoint for
``hf://``, ``timm:`` and the CrossMAE entries, read at each call. Both exist for local mirrors and
the tests' loopback server; the cache path always follows the canonical URL.

Command line::

    python -m crossmae.zoo list
    python -m crossmae.zoo download NAME|URI [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .utils import UserError, atomic_write_json, cli_entry, sha256_file

#: Environment variable naming the download cache folder.
CACHE_ENV = "CROSSMAE_CACHE"
#: Environment variable: a URL prefix replacing scheme + host of the registry's plain-URL entries.
MIRROR_ENV = "CROSSMAE_ZOO_MIRROR"
PIN_SUFFIX = ".sha256.json"
_TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's own order (timm/models/_hub.py)

_MAE_README = "facebookresearch/mae README.md"
_MAE_FT = "facebookresearch/mae FINETUNE.md"
_CROSSMAE_README = "TonyLianLong/CrossMAE README.md"
_HF_CROSSMAE = "hf://longlian/CrossMAE/"


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint.

    Attributes:
        name: registry name (``zoo:<name>``). method: ``"mae"`` or ``"crossmae"`` (the pretraining
            method; for a fine-tuned entry, that of the backbone it was fine-tuned from).
        arch: ``crossmae.models.ARCHS`` name. finetuned: an ImageNet fine-tuned classifier.
        layout: the ``LoadReport.format`` the file is expected to be recognised as.
        pretrain_epochs: pretraining epochs. resolution: pretraining input size (px).
        reported_ft_top1: the authors' ImageNet-1K fine-tuning top-1 (%) for this checkpoint
            (``reported_source`` says where it is written). paper_ft_top1: the paper's table value.
        uri: where the file is (``hf://…`` or ``https://…``). url: its web address.
        sha256: the expected SHA-256 when the authors publish one, else None (then it is pinned at
            first download). md5_prefix: the md5 prefix the README prints (informational).
        pretrained: for a fine-tuned entry, the registry name of its pretrained counterpart.
        notes: anything the README gets wrong or leaves open. The mask and prediction ratios are
            deliberately not here: they are read from the checkpoint's own ``args`` after download.
    """
    name: str
    method: str
    arch: str
    finetuned: bool
    layout: str
    pretrain_epochs: int
    resolution: int
    reported_ft_top1: float
    reported_source: str
    uri: str
    paper_ft_top1: float | None = None
    sha256: str | None = None
    md5_prefix: str | None = None
    pretrained: str | None = None
    notes: str = ""

    @property
    def url(self) -> str:
        return _canonical_url(self.uri)

    def to_dict(self) -> dict:
        """JSON-ready dict (the ``zoo`` field of a load report); includes ``url``."""
        return dict(asdict(self), url=self.url)


def _mae(size: str, arch: str, pt_top1: float, ft_top1: float, paper: float, md5_pt: str, md5_ft: str) -> list[ZooEntry]:
    name = f"mae_vit_{size}"
    common = dict(method="mae", arch=arch, pretrain_epochs=1600, resolution=224, paper_ft_top1=paper)
    return [
        ZooEntry(name=name, finetuned=False, layout="mae_encoder", reported_ft_top1=pt_top1,
                 reported_source=f"{_MAE_README} (fine-tuning table)",
                 uri=f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{size}.pth", md5_prefix=md5_pt,
                 notes="encoder-only release ({'model': encoder with final norm}, no decoder, no args): the "
                       "mask ratio (0.75 in the paper) cannot be read from the file", **common),
        ZooEntry(name=f"{name}_ft", finetuned=True, layout="mae_finetune", reported_ft_top1=ft_top1,
                 reported_source=f"{_MAE_FT} (evaluation of this checkpoint)",
                 uri=f"https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_{size}.pth", md5_prefix=md5_ft,
                 pretrained=name, notes="global-pool classifier (fc_norm + head, no final norm)", **common),
    ]


def _crossmae(size: str, arch: str, folder: str, stem: str, top1: float, paper: float | None, *, epochs: int = 800,
              resolution: int = 224, suffix: str = "", notes: str = "") -> list[ZooEntry]:
    name = f"crossmae_vit_{size}{suffix}"
    common = dict(method="crossmae", arch=arch, pretrain_epochs=epochs, resolution=resolution,
                  reported_ft_top1=top1, paper_ft_top1=paper,
                  reported_source=f"{_CROSSMAE_README} (reference ImageNet accuracy of the fine-tuned checkpoint)")
    ft_note = "fine-tuned classifier; " + notes if notes else "fine-tuned classifier"
    return [
        ZooEntry(name=name, finetuned=False, layout="crossmae_pretrain",
                 uri=f"{_HF_CROSSMAE}{folder}/imagenet-mae-cross-{stem.format('pretrain')}.pth", notes=notes, **common),
        ZooEntry(name=f"{name}_ft", finetuned=True, layout="mae_finetune", pretrained=name,
                 uri=f"{_HF_CROSSMAE}{folder}/imagenet-mae-cross-{stem.format('finetune')}.pth", notes=ft_note, **common),
    ]


_PAPER = "CrossMAE paper Table 1"
#: Every released checkpoint by name. Sources: facebookresearch/mae README.md and FINETUNE.md
#: (files, md5 prefixes, accuracies), TonyLianLong/CrossMAE README.md (Hub files, accuracies), the
#: CrossMAE paper (arXiv 2401.14391) Table 1 / Table 3f.
REGISTRY: dict[str, ZooEntry] = {e.name: e for e in [
    *_mae("base", "vit_base_patch16", 83.6, 83.664, 83.6, "8cad7c", "1b25e9"),
    *_mae("large", "vit_large_patch16", 85.9, 85.952, 85.9, "b8b06e", "51f550"),
    *_mae("huge", "vit_huge_patch14", 86.9, 86.928, 86.9, "9bdbb0", "2541f2"),
    *_crossmae("small", "vit_small_patch16", "vits-mr0.75-kmr0.75-dd12", "vits-{}-wfm-mr0.75-kmr0.75-dd12-ep800-ui",
               79.318, 79.3),
    *_crossmae("base", "vit_base_patch16", "vitb-mr0.75-kmr0.75-dd12", "vitb-{}-wfm-mr0.75-kmr0.75-dd12-ep800-ui",
               83.722, 83.7),
    *_crossmae("base", "vit_base_patch16", "vitb-mr0.75-kmr0.75-dd12-448-400",
               "vitb-{}-wfm-mr0.75-kmr0.25-dd12-ep400-ui-res-448", 84.598, None, epochs=400, resolution=448,
               suffix="_448",
               notes="the README's folder name says kmr0.75 (and its text says kept mask ratio 0.75 for all but "
                     "ViT-H) while the file name says kmr0.25; the paper (Table 3f, 448 px: 84.6) trains the 448 "
                     "models with a 25% prediction ratio; trust the checkpoint's args"),
    *_crossmae("large", "vit_large_patch16", "vitl-mr0.75-kmr0.75-dd12", "vitl-{}-wfm-mr0.75-kmr0.75-dd12-ep800-ui",
               85.432, 85.4),
    *_crossmae("huge", "vit_huge_patch14", "vith-mr0.75-kmr0.25-dd12", "vith-{}-wfm-mr0.75-kmr0.25-dd12-ep800-ui",
               86.256, 86.3, notes="the README gives ViT-H a kept mask ratio of 0.25 (paper Table 1: CrossMAE "
                                   "(25%) 86.3, (75%) 86.4)"),
]}


# --------------------------------------------------------------------------------------------------
# parsing a --backbone value
# --------------------------------------------------------------------------------------------------
@dataclass
class _Remote:
    """A remote file: ``kind`` ``"hf"`` (repo_id, filename, revision) or ``"url"`` (url, fetch_url)."""
    spec: str
    kind: str
    url: str                       # canonical web URL (messages, cache key)
    cache_path: Path
    repo_id: str = ""
    filename: str = ""
    revision: str = "main"
    fetch_url: str = ""            # url kind: where to GET it (a mirror may replace the host)
    expected_sha256: str | None = None
    entry: ZooEntry | None = None


def cache_root() -> Path:
    """``$CROSSMAE_CACHE`` or ``~/.cache/crossmae`` (not created)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "crossmae").expanduser()


def is_uri(spec: str | os.PathLike) -> bool:
    """True for ``zoo:`` / ``hf://`` / ``timm:`` / ``http(s)://`` values (anything resolved remotely)."""
    s = str(spec)
    return s.startswith(("zoo:", "hf://", "timm:", "http://", "https://"))


def _canonical_url(uri: str) -> str:
    if uri.startswith("hf://"):
        repo_id, filename, revision = _split_hf(uri)
        return f"https://huggingface.co/{repo_id}/resolve/{revision}/{filename}"
    return uri


def _split_hf(uri: str) -> tuple[str, str, str]:
    body = uri[len("hf://"):]
    revision = "main"
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = body.split("/")
    if len(parts) < 3 or not all(parts) or not revision:
        raise UserError(f"--backbone {uri}: expected hf://OWNER/REPO/PATH[@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def _safe_rel(*parts: str) -> Path:
    rel = Path(*[p for part in parts for p in part.split("/") if p])
    if any(p in ("..", ".") for p in rel.parts) or rel.is_absolute():
        raise UserError(f"{'/'.join(parts)}: not a safe cache path")
    return rel


def _hf_remote(spec: str, repo_id: str, filename: str, revision: str, entry: ZooEntry | None = None) -> _Remote:
    return _Remote(spec=spec, kind="hf", url=f"https://huggingface.co/{repo_id}/resolve/{revision}/{filename}",
                   cache_path=cache_root() / "hf" / _safe_rel(repo_id, revision, filename), repo_id=repo_id,
                   filename=filename, revision=revision, entry=entry,
                   expected_sha256=entry.sha256 if entry else None)


def _url_remote(spec: str, url: str, entry: ZooEntry | None = None) -> _Remote:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or not u.path.strip("/"):
        raise UserError(f"--backbone {spec}: not a file URL")
    host = u.hostname + (f"_{u.port}" if u.port else "")
    fetch = url
    mirror = os.environ.get(MIRROR_ENV)
    if entry is not None and mirror:
        fetch = mirror.rstrip("/") + u.path
    return _Remote(spec=spec, kind="url", url=url, cache_path=cache_root() / "url" / _safe_rel(host, u.path),
                   fetch_url=fetch, entry=entry, expected_sha256=entry.sha256 if entry else None)


def _remotes(spec: str) -> list[_Remote]:
    """The candidate remote files for ``spec`` (several only for ``timm:`` without a hub file name).

    Raises:
        UserError: the value does not parse (an unknown name, a port out of range, a broken IPv6
            host: ``urllib``'s ``ValueError`` becomes the one line).
    """
    try:
        return _parse_remotes(spec)
    except ValueError as exc:
        raise UserError(f"--backbone {spec}: not a valid URI ({str(exc).splitlines()[0] if str(exc) else 'ValueError'})") \
            from None


def _parse_remotes(spec: str) -> list[_Remote]:
    if spec.startswith("zoo:"):
        entry = REGISTRY.get(spec[4:])
        if entry is None:
            raise UserError(f"--backbone {spec}: unknown checkpoint name (known: {', '.join(REGISTRY)}; "
                            f"see python -m crossmae.zoo list)")
        if entry.uri.startswith("hf://"):
            return [_hf_remote(spec, *_split_hf(entry.uri), entry=entry)]
        return [_url_remote(spec, entry.uri, entry=entry)]
    if spec.startswith("hf://"):
        return [_hf_remote(spec, *_split_hf(spec), entry=_entry_by_uri(spec))]
    if spec.startswith(("http://", "https://")):
        u = urlsplit(spec)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", u.path)
        if u.hostname == "huggingface.co" and m:  # a Hub file link (as the CrossMAE README gives them)
            return [_hf_remote(spec, m[1], m[3], m[2], entry=_entry_by_uri(f"hf://{m[1]}/{m[3]}@{m[2]}"))]
        return [_url_remote(spec, spec)]
    if spec.startswith("timm:"):
        from timm.models import get_pretrained_cfg
        name = spec[5:]
        try:
            cfg = get_pretrained_cfg(name) if name else None
        except RuntimeError as exc:  # a known architecture with an unknown tag
            cfg, why = None, f" ({exc})"
        else:
            why = ""
        if cfg is None:
            raise UserError(f"--backbone {spec}: timm {timm_version()} has no pretrained config {name!r}{why} "
                            f"(see timm.list_pretrained(); give MODEL.TAG)")
        if cfg.hf_hub_id:
            hub_id, _, rev = cfg.hf_hub_id.partition("@")
            files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(_TIMM_HUB_FILES)
            return [_hf_remote(spec, hub_id, f, rev or "main") for f in files]
        if cfg.url:
            return [_url_remote(spec, cfg.url)]
        raise UserError(f"--backbone {spec}: timm's pretrained config has neither hf_hub_id nor url")
    raise UserError(f"--backbone {spec}: not a URI")


def _entry_by_uri(uri: str) -> ZooEntry | None:
    for e in REGISTRY.values():
        if _canonical_url(e.uri) == _canonical_url(uri):
            return e
    return None


def timm_version() -> str:
    import timm
    return timm.__version__


def validate_spec(spec: str | os.PathLike) -> None:
    """Check a ``--backbone`` value without any download: the URI parses and a ``zoo:`` name or
    ``timm:`` tag exists; a local path exists. For the suites' planning (``slurm.submit``).

    Raises:
        UserError: one line naming the value and the problem.
    """
    if is_uri(spec):
        _remotes(str(spec))
    elif not Path(spec).expanduser().exists():
        raise UserError(f"{spec}: --backbone checkpoint not found")


def zoo_entry(spec: str | os.PathLike) -> dict | None:
    """The registry entry (:meth:`ZooEntry.to_dict`) that ``spec`` names, or None.

    ``zoo:NAME``, the entry's own URI (``hf://…`` / its URL) and the entry's cached file path all
    name it.
    """
    s = str(spec)
    if s.startswith("zoo:"):
        e = REGISTRY.get(s[4:])
        return e.to_dict() if e else None
    if s.startswith(("hf://", "http://", "https://")):
        try:
            r = _remotes(s)[0]
        except UserError:
            return None
        e = r.entry or (_entry_by_uri(f"hf://{r.repo_id}/{r.filename}@{r.revision}") if r.kind == "hf"
                        else next((e for e in REGISTRY.values() if e.url == r.url), None))
        return e.to_dict() if e else None
    if not is_uri(s):
        try:
            p = Path(s).expanduser().resolve()
        except OSError:
            return None
        for e in REGISTRY.values():
            if p == _remotes(f"zoo:{e.name}")[0].cache_path.resolve():
                return e.to_dict()
    return None


# --------------------------------------------------------------------------------------------------
# resolving
# --------------------------------------------------------------------------------------------------
def resolve_backbone(spec: str | Path, *, force: bool = False) -> Path:
    """The local checkpoint file that ``spec`` (a ``--backbone`` value) names, downloading it once.

    Args:
        spec: a local path or a URI (see the module docstring).
        force: download again even when cached (the new file must match the pinned SHA-256).

    Returns:
        the file's ``Path`` (for a URI: inside :func:`cache_root`).

    Raises:
        UserError: a missing local file; a bad URI, unknown zoo name or timm tag; offline (or no
            network) with the file not cached (the message names the URL and the cache path to put
            the file at); a download refused as truncated, altered (SHA-256 differs from the
            expected / pinned one) or unreadable; an HTTP error. One line each.
    """
    if not is_uri(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{spec}: --backbone checkpoint not found")
        return path
    remotes = _remotes(str(spec))
    for r in remotes:
        if r.cache_path.is_file() and not force:
            return _check_cached(r)
    if _offline():
        r = remotes[0]
        raise UserError(f"--backbone {spec}: not in the cache and offline (HF_HUB_OFFLINE): download {r.url} "
                        f"and put it at {r.cache_path}")
    last: _Missing | None = None
    for r in remotes:
        try:
            return _download(r)
        except _Missing as exc:  # timm: try the next hub file name
            last = exc
    raise UserError(f"--backbone {spec}: {last}")


class _Missing(Exception):
    """The server says the file does not exist (404)."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + PIN_SUFFIX)


def _read_pin(path: Path) -> dict | None:
    """The pin of a cached file (:func:`crossmae.safeio.load_json`, kind ``pin``), None when absent.

    Raises:
        UserError: the pin is not a regular file (a folder, a symlink, a FIFO) or not of the pin's
            shape (one line: delete it to pin the file again).
    """
    from .safeio import load_json
    p = _pin_path(path)
    try:
        pin = load_json(p, "pin", missing_ok=True)
    except UserError as exc:
        raise UserError(f"{exc} (cache pin; delete it to pin the cached file again)") from None
    if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin["sha256"]):
        raise UserError(f"{p}: pin's sha256 {pin['sha256'][:70]!r} is not a hex SHA-256; refused (delete it to "
                        f"pin the cached file again)")
    return pin


def known_sha256(path: str | os.PathLike) -> str | None:
    """The pinned SHA-256 of a cached file when its size and mtime still match the pin, else None.

    Informational only: a pin is never what goes into a result; results carry the SHA-256 of the
    bytes that were loaded (:func:`check_loaded_sha256`)."""
    path = Path(path)
    pin = _read_pin(path)
    try:
        st = path.stat()
    except OSError:
        return None
    if pin and pin.get("size") == st.st_size and pin.get("mtime_ns") == st.st_mtime_ns:
        return pin["sha256"]
    return None


def check_loaded_sha256(path: str | os.PathLike, sha: str) -> None:
    """Refuse the bytes just loaded from ``path`` when ``path`` is a cached download whose pin names
    another SHA-256 (a same-size edit with its mtime restored, or a forged pin). ``sha``: the hex
    SHA-256 computed while the bytes were read (:func:`crossmae.safeio.read_hashed`).

    Raises:
        UserError: one line naming the file, both digests and how to recover.
    """
    path = Path(path)
    if not os.path.lexists(_pin_path(path)):
        return
    pin = _read_pin(path)
    if pin is not None and pin["sha256"] != sha:
        raise UserError(f"{path}: refused: the sha256 of the bytes loaded, {sha[:12]}…, differs from the "
                        f"{pin['sha256'][:12]}… pinned for this cached file (edited on disk, or a forged pin); "
                        f"delete both to download it again")


def _write_pin(r: _Remote, path: Path, sha: str, extra: dict | None = None) -> None:
    st = path.stat()
    pin = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "source": r.spec, "url": r.url,
           "zoo": r.entry.name if r.entry else None, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    old = _read_pin(path)
    if old and old.get("sha256") == sha:
        pin["pinned_at"] = old.get("pinned_at", pin["pinned_at"])
    pin.update(extra or {})
    atomic_write_json(pin, _pin_path(path))


def _check_cached(r: _Remote) -> Path:
    """A cached file, checked against its pin (size, and SHA-256 when the mtime changed); a file put
    there by hand (no pin yet) is checked for readability and the expected SHA-256, then pinned."""
    path = r.cache_path
    pin = _read_pin(path)
    st = path.stat()
    if pin is None:
        sha = sha256_file(path)
        _check_sha(r, sha, label=str(path))
        _check_readable(path, str(path), _is_safetensors(r))
        _write_pin(r, path, sha)
        return path
    if pin.get("size") != st.st_size:
        raise UserError(f"{path}: cached file has {st.st_size} bytes but {pin.get('size')} were pinned at first "
                        f"download (sha256 {pin['sha256'][:12]}…); refused; delete it to download {r.url} again")
    if pin.get("mtime_ns") != st.st_mtime_ns:
        sha = sha256_file(path)
        if sha != pin["sha256"]:
            raise UserError(f"{path}: cached file's sha256 {sha[:12]}… differs from the {pin['sha256'][:12]}… pinned "
                            f"at first download; refused; delete it to download {r.url} again")
        _write_pin(r, path, sha)
    return path


def _check_sha(r: _Remote, sha: str, *, label: str, hub_sha: str | None = None) -> None:
    """Refuse ``sha`` when it differs from the expected, the Hub's LFS or the pinned SHA-256; ``label``
    names the file in the error."""
    pin = _read_pin(r.cache_path)
    for expected, what in ((r.expected_sha256, "the registry's expected"), (hub_sha, "the Hub's (LFS ETag)"),
                           (pin and pin["sha256"], "the one pinned at first download")):
        if expected and sha != expected:
            extra = f" (delete {_pin_path(r.cache_path)} to accept a new file)" if what.startswith("the one") else ""
            raise UserError(f"{label}: refused: sha256 {sha[:12]}… differs from {what} {expected[:12]}…{extra}")


def _check_readable(path: Path, label: str, safetensors: bool) -> None:
    """A checkpoint file that can be read to its end: a zip archive (``torch.save``) whose every
    member passes its CRC, a safetensors file whose header and data agree, or a legacy pickle that
    ``safe_torch_load`` reads. ``label`` names the file in the error."""
    from .utils import safe_torch_load
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise UserError(f"{label}: refused: corrupt checkpoint (CRC error in {bad})")
            return
        if safetensors:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
            return
        safe_torch_load(path)
    except UserError as exc:
        if str(exc).startswith(label):
            raise
        detail = str(exc).split(": ", 1)[-1].split(". ")[0]  # the reason's first sentence
        raise UserError(f"{label}: refused: {detail}") from None
    except Exception as exc:  # zipfile / safetensors raise several types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: refused: not a readable checkpoint (truncated or corrupt?): {first}") from None


def _is_safetensors(r: _Remote) -> bool:
    return r.cache_path.name.endswith(".safetensors")


def _cache_dir(r: _Remote) -> Path:
    """The cache folder of ``r``, created: a real folder (not a symlink) that can be written.

    Raises:
        UserError: the cache root is a file, lies under a file, is not writable, or a folder on the
            way is a symlink (one line naming it and ``$CROSSMAE_CACHE``).
    """
    from .safeio import real_dir
    try:
        return real_dir(r.cache_path.parent, f"download cache folder (${CACHE_ENV})", create=True)
    except UserError as exc:
        raise UserError(f"{exc}; set ${CACHE_ENV} to a writable folder") from None


def _download(r: _Remote) -> Path:
    """Fetch ``r`` into a hidden temporary folder beside its cache path, check it, move it in place."""
    folder = _cache_dir(r)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{r.cache_path.name}.", suffix=".download", dir=folder))
    except OSError as exc:
        from .safeio import oserror_line
        raise UserError(f"{oserror_line(folder, exc, 'download cache folder cannot be written')}; set "
                        f"${CACHE_ENV} to a writable folder") from None
    try:
        if r.kind == "hf":
            tmp, hub_sha, extra = _fetch_hf(r, staging)
            where = extra["location"]
        else:
            tmp, hub_sha, extra, where = _fetch_url(r, staging), None, {}, r.fetch_url
        label = f"--backbone {r.spec}: download from {where}"
        sha = sha256_file(tmp)
        _check_sha(r, sha, label=label, hub_sha=hub_sha)
        _check_readable(tmp, label, _is_safetensors(r))
        if r.entry is not None and r.entry.md5_prefix:
            extra["md5"] = _md5(tmp)
        if os.path.lexists(r.cache_path) and not os.path.islink(r.cache_path) and not r.cache_path.is_file():
            raise UserError(f"{r.cache_path}: cache path exists and is not a regular file (a folder?); refused; "
                            f"remove it to download {r.url}")
        os.replace(tmp, r.cache_path)
        _write_pin(r, r.cache_path, sha, extra)
        return r.cache_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _http_error_line(r: _Remote, exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"HTTP {status}" if status else first


def _fetch_hf(r: _Remote, staging: Path) -> tuple[Path, str | None, dict]:
    """``hf_hub_download`` into ``staging`` (its ``local_dir`` mode: huggingface_hub writes a temporary
    file and checks the size); returns (file, the Hub's LFS SHA-256 or None, pin extras)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it at import
    url = hf_hub_url(r.repo_id, r.filename, revision=r.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
        revision = meta.commit_hash or r.revision
        path = hf_hub_download(r.repo_id, r.filename, revision=revision, local_dir=staging, endpoint=endpoint,
                               cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise UserError(f"--backbone {r.spec}: cannot reach {url} ({type(exc).__name__}): download {r.url} and put "
                        f"it at {r.cache_path}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        raise _Missing(f"{url}: not found on the Hub ({type(exc).__name__})") from None
    except HfHubHTTPError as exc:
        raise UserError(f"--backbone {r.spec}: download from {url} failed: {_http_error_line(r, exc)}") from None
    except OSError as exc:  # huggingface_hub's size consistency check, disk errors, network errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "truncated download" if "Consistency check failed" in msg else "download failed"
        raise UserError(f"--backbone {r.spec}: {kind} from {url} refused: {msg}") from None
    except Exception as exc:  # httpx errors (connection refused, protocol errors) are not OSErrors
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise UserError(f"--backbone {r.spec}: cannot reach {url} ({type(exc).__name__}): download {r.url} and "
                            f"put it at {r.cache_path}") from None
        raise
    etag = (meta.etag or "").strip('"')
    hub_sha = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    return Path(path), hub_sha, {"commit": meta.commit_hash, "hub_etag": etag or None, "location": url}


def _fetch_url(r: _Remote, staging: Path) -> Path:
    """GET ``r.fetch_url`` into ``staging`` with huggingface_hub's ``http_get`` (tqdm progress bar,
    resumes a dropped connection, raises when fewer bytes than ``Content-Length`` arrive)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    tmp = staging / r.cache_path.name
    try:
        with open(tmp, "wb") as f:
            http_get(r.fetch_url, f, displayed_filename=r.cache_path.name)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            raise _Missing(f"{r.fetch_url}: HTTP 404 not found") from None
        if status == 416:  # a dropped connection whose resume the server refused
            raise UserError(f"--backbone {r.spec}: truncated download from {r.fetch_url} refused (connection "
                            f"closed early, resume refused)") from None
        raise UserError(f"--backbone {r.spec}: download from {r.fetch_url} failed: {_http_error_line(r, exc)}") from None
    except OSError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "truncated download" if "Consistency check failed" in msg else "download failed"
        raise UserError(f"--backbone {r.spec}: {kind} from {r.fetch_url} refused: {msg}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            name = type(exc).__name__
            if "Protocol" in name:
                raise UserError(f"--backbone {r.spec}: truncated download from {r.fetch_url} refused ({name})") from None
            raise UserError(f"--backbone {r.spec}: cannot reach {r.fetch_url} ({name}): download {r.url} and put it "
                            f"at {r.cache_path}") from None
        raise
    return tmp


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def _fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``list`` prints the registry; ``download NAME|URI`` fetches one file and reports what it holds."""
    p = argparse.ArgumentParser(prog="python -m crossmae.zoo", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the registry of released checkpoints")
    pd = sub.add_parser("download", help="fetch one checkpoint into the cache")
    pd.add_argument("name", help="a registry name, zoo:NAME, hf://…, timm:MODEL.TAG or http(s)://…")
    pd.add_argument("--force", action="store_true", help="download again (must match the pinned sha256)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        rows = [["name", "method", "arch", "ft", "epochs", "res", "top1", "cached", "url"]]
        for e in REGISTRY.values():
            cached = _remotes(f"zoo:{e.name}")[0].cache_path.is_file()
            rows.append([e.name, e.method, e.arch, "yes" if e.finetuned else "no", str(e.pretrain_epochs),
                         str(e.resolution), f"{e.reported_ft_top1:g}", "yes" if cached else "no", e.url])
        print(_fmt_table(rows))
        print(f"cache: {cache_root()}  (use --backbone zoo:NAME)")
        return 0
    spec = args.name if is_uri(args.name) else f"zoo:{args.name}"
    path = resolve_backbone(spec, force=args.force)
    from .backbone import load_encoder_state_dict
    _, report = load_encoder_state_dict(spec)
    m = report.meta
    print(f"{spec} -> {path}")
    print(f"  sha256 {report.sha256}")
    print(f"  format {report.format}, arch {report.arch}, method {m.get('method')}, "
          f"mask ratio {m.get('mask_ratio')}, prediction ratio {m.get('kept_mask_ratio')} (from the checkpoint's args)")
    entry = report.zoo
    if entry:
        pin = _read_pin(path) or {}
        if entry.get("md5_prefix") and pin.get("md5"):
            ok = pin["md5"].startswith(entry["md5_prefix"])
            print(f"  md5 {pin['md5'][:12]}… {'matches' if ok else 'does NOT match'} the README's {entry['md5_prefix']}")
        print(f"  reported ImageNet fine-tune top-1 {entry['reported_ft_top1']} ({entry['reported_source']})")
        if entry.get("notes"):
            print(f"  notes: {entry['notes']}")
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
