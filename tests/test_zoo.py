"""crossmae.zoo: --backbone URIs resolved through the real clients (huggingface_hub, timm's pretrained
configs, plain HTTP) against a real HTTP server on 127.0.0.1 serving tiny checkpoints in the official
layouts at Hub-style paths; the refusals (offline, truncated, altered, pinned) as one-line errors."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import re
import threading
from pathlib import Path

import pytest
import torch

from crossmae import zoo
from crossmae.backbone import load_backbone, load_encoder_state_dict
from crossmae.backbone import main as backbone_main
from crossmae.models import ARCHS, create_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


# --------------------------------------------------------------------------------------------------
# tiny checkpoints in the official layouts (as facebookresearch/mae and TonyLianLong/CrossMAE save them)
# --------------------------------------------------------------------------------------------------
def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pretrain_args(name: str, **kw) -> argparse.Namespace:
    # the fields of main_pretrain.py's parser that matter here (CrossMAE adds cross_mae / kept_mask_ratio)
    return argparse.Namespace(model=name, input_size=64, mask_ratio=0.75, epochs=800, norm_pix_loss=True,
                              blr=1.5e-4, batch_size=8, **kw)


def _finetuned_vit(seed: int) -> dict:
    from timm.models.vision_transformer import VisionTransformer
    a = ARCHS["vit_tiny_patch16"]
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=64, patch_size=a.patch_size, embed_dim=a.embed_dim, depth=a.depth,
                            num_heads=a.num_heads, num_classes=10, global_pool="avg", fc_norm=True)
    return vit.state_dict()


@pytest.fixture(scope="session")
def layouts() -> dict[str, bytes]:
    """name → checkpoint bytes: MAE pretraining (full model + decoder, main_pretrain.py's save_model),
    the MAE encoder-only release, a fine-tuned classifier (MAE release: {'model'}), the CrossMAE
    pretraining release (args with cross_mae, kept_mask_ratio 0.25) and a CrossMAE fine-tune (full
    save_model container with main_finetune.py's args)."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", img_size=64).state_dict()
    torch.manual_seed(1)
    cross = create_model("crossmae_vit_tiny_patch16", img_size=64, use_input=True).state_dict()
    encoder = {k: v for k, v in mae.items() if not k.startswith(("decoder_", "mask_token"))}
    return {
        "mae_pretrain": _bytes({"model": mae, "optimizer": {}, "epoch": 799, "scaler": {},
                                "args": _pretrain_args("mae_vit_tiny_patch16", decoder_depth=2)}),
        "mae_encoder": _bytes({"model": encoder}),
        "mae_finetune": _bytes({"model": _finetuned_vit(2)}),
        "crossmae_pretrain": _bytes({"model": cross, "optimizer": {}, "epoch": 399, "scaler": {},
                                     "args": _pretrain_args("mae_vit_tiny_patch16", cross_mae=True, weight_fm=True,
                                                            use_input=True, kept_mask_ratio=0.25, decoder_depth=2)}),
        "crossmae_finetune": _bytes({"model": _finetuned_vit(3), "optimizer": {}, "epoch": 99, "scaler": {},
                                     "args": argparse.Namespace(model="vit_tiny_patch16", finetune="ckpt.pth",
                                                                global_pool=True, epochs=100)}),
    }


# expected (format, method, mask ratio, prediction ratio) read from each layout
EXPECT = {
    "mae_pretrain": ("mae_pretrain", "mae", 0.75, 0.75),
    "mae_encoder": ("mae_encoder", "mae", None, None),
    "mae_finetune": ("mae_finetune", "mae", None, None),
    "crossmae_pretrain": ("crossmae_pretrain", "crossmae", 0.75, 0.25),
    "crossmae_finetune": ("mae_finetune", "crossmae", None, None),
}
# the registry entry of each released layout (the MAE full-model pretraining layout is not released)
ZOO_NAME = {"mae_encoder": "mae_vit_base", "mae_finetune": "mae_vit_base_ft",
            "crossmae_pretrain": "crossmae_vit_base_448", "crossmae_finetune": "crossmae_vit_base_ft"}


# --------------------------------------------------------------------------------------------------
# the loopback server
# --------------------------------------------------------------------------------------------------
class Hub:
    """Files by URL path; Hub-style paths answer HEAD with the Hub's headers (X-Repo-Commit, the LFS
    sha256 as ETag, the size). ``mode[path]``: ``short`` (fewer bytes than the Hub's size, honest
    Content-Length), ``drop`` (Content-Length of the whole file, connection closed half-way, every
    retry refused with 416), ``alter`` (one byte changed, same size, the Hub still announcing the original
    sha256)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []

    def put(self, path: str, data: bytes, mode: str = "ok") -> None:
        self.files[path] = data
        self.mode[path] = mode

    def lookup(self, path: str) -> str | None:
        path = path.split("?")[0]
        if path in self.files:
            return path
        m = HUB_PATH.match(path)
        if m:  # any revision (a branch or the commit huggingface_hub pinned) serves the same file
            for p in self.files:
                n = HUB_PATH.match(p)
                if n and (n["repo"], n["file"]) == (m["repo"], m["file"]):
                    return p
        return None


def _handler(hub: Hub):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _head(self, key: str, body: bytes, status: int = 200, size: int | None = None):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            if HUB_PATH.match(key):
                sha = hashlib.sha256(hub.files[key]).hexdigest()
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(size if size is not None else len(hub.files[key])))
            self.end_headers()

        def _reply(self, send_body: bool):
            hub.requests.append((self.command, self.path))
            key = hub.lookup(self.path)
            if key is None:
                body = b"not found"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                if HUB_PATH.match(self.path):
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                if send_body:
                    self.wfile.write(body)
                return
            data, mode = hub.files[key], hub.mode[key]
            if mode == "drop" and any(r == ("GET", self.path) for r in hub.requests[:-1]):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not send_body:
                self._head(key, data)
                return
            if mode == "short":
                self._head(key, data[: len(data) // 2])
                self.wfile.write(data[: len(data) // 2])
            elif mode == "drop":
                self._head(key, data)
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif mode == "alter":
                bad = bytearray(data)
                bad[len(bad) // 2] ^= 0xFF
                self._head(key, bytes(bad))
                self.wfile.write(bytes(bad))
            else:
                self._head(key, data)
                self.wfile.write(data)

        def do_HEAD(self):
            self._reply(False)

        def do_GET(self):
            self._reply(True)

    return H


@pytest.fixture(scope="session")
def server():
    hub = Hub()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    hub.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield hub
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def hub(server, tmp_path, monkeypatch):
    """The loopback server, emptied; a fresh cache; huggingface_hub and the registry's URL entries
    pointed at the server."""
    server.files.clear(), server.mode.clear(), server.requests.clear()
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
    monkeypatch.setenv("CROSSMAE_ZOO_MIRROR", server.base)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server.cache = tmp_path / "cache"
    return server


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _serve(hub: Hub, scheme: str, layout: str, data: bytes, mode: str = "ok") -> str:
    """Put ``data`` where ``scheme`` will look for it; return the --backbone value."""
    if scheme == "zoo":
        entry = zoo.REGISTRY[ZOO_NAME[layout]]
        if entry.uri.startswith("hf://"):
            repo, file, rev = zoo._split_hf(entry.uri)
            hub.put(f"/{repo}/resolve/{rev}/{file}", data, mode)
        else:  # the mirror replaces https://dl.fbaipublicfiles.com
            hub.put(re.sub(r"^https://[^/]+", "", entry.uri), data, mode)
        return f"zoo:{entry.name}"
    if scheme == "hf":
        hub.put(f"/testorg/tiny-{layout}/resolve/v1/weights/{layout}.pth", data, mode)
        return f"hf://testorg/tiny-{layout}/weights/{layout}.pth@v1"
    if scheme == "timm":  # no model.safetensors in the repo: timm's fallback name pytorch_model.bin
        hub.put("/timm/vit_base_patch16_224.mae/resolve/main/pytorch_model.bin", data, mode)
        return "timm:vit_base_patch16_224.mae"
    hub.put(f"/files/{layout}.pth", data, mode)
    return f"{hub.base}/files/{layout}.pth"


def _exit2(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


# --------------------------------------------------------------------------------------------------
# every layout through every scheme
# --------------------------------------------------------------------------------------------------
CASES = [(s, lay) for s in ("zoo", "hf", "timm", "http") for lay in EXPECT if not (s == "zoo" and lay not in ZOO_NAME)]


@pytest.mark.parametrize("scheme,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_each_layout_through_each_scheme_downloads_and_loads(hub, layouts, scheme, layout):
    data = layouts[layout]
    spec = _serve(hub, scheme, layout, data)
    model, rep = load_backbone(spec, img_size=64)
    fmt, method, mask, pred = EXPECT[layout]
    if fmt == "mae_finetune" and scheme != "zoo":
        method = None  # a fine-tuned file does not say how its backbone was pretrained; only an entry does
    assert (rep.format, rep.arch, rep.meta.get("method")) == (fmt, "vit_tiny_patch16", method)
    assert (rep.meta.get("mask_ratio"), rep.meta.get("kept_mask_ratio")) == (mask, pred)
    assert rep.source == spec and rep.sha256 == hashlib.sha256(data).hexdigest()
    # the file in the cache is the served one, pinned; nothing else (no temporary file) is left
    cached = Path(rep.path)
    assert cached.read_bytes() == data and hub.cache in cached.parents
    pin = json.loads(cached.with_name(cached.name + zoo.PIN_SUFFIX).read_text())
    assert pin["sha256"] == rep.sha256 and pin["size"] == len(data)
    meta_dirs = [p for p in _files(hub.cache) if p not in (cached, cached.with_name(cached.name + zoo.PIN_SUFFIX))]
    assert meta_dirs == []
    # weights really came from the file
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(io.BytesIO(data), weights_only=True)["model"]
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], raw["blocks.1.attn.qkv.weight"])
    d = rep.to_dict()
    assert d["source"] == spec
    if scheme == "zoo":
        entry = zoo.REGISTRY[ZOO_NAME[layout]]
        assert d["zoo"]["name"] == entry.name and d["zoo"]["reported_ft_top1"] == entry.reported_ft_top1
        assert d["zoo"]["layout"] == rep.format
        if rep.format == "mae_finetune":  # the file cannot tell MAE from CrossMAE: the entry does
            assert rep.meta["method_from"] == "zoo"
    else:
        assert d["zoo"] is None
    # a second resolution uses the cache: no request reaches the server
    n = len(hub.requests)
    _, rep2 = load_encoder_state_dict(spec)
    assert len(hub.requests) == n and rep2.sha256 == rep.sha256


def test_timm_safetensors_weights_and_inspect_cli(hub, capsys):
    """timm's own layout (model.safetensors, bare timm names) through timm:, inspected by the
    backbone CLI; the registry URI of a zoo entry finds its entry too."""
    from safetensors.torch import save
    from timm.models.vision_transformer import VisionTransformer
    a = ARCHS["vit_tiny_patch16"]
    torch.manual_seed(4)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
                            num_classes=0)
    data = save({k: v.contiguous() for k, v in vit.state_dict().items()})
    hub.put("/timm/vit_base_patch16_224.mae/resolve/main/model.safetensors", data)
    rep = backbone_main(["inspect", "timm:vit_base_patch16_224.mae"])
    out = capsys.readouterr().out
    assert rep.format == "timm" and rep.sha256 == hashlib.sha256(data).hexdigest()
    assert rep.path.endswith("hf/timm/vit_base_patch16_224.mae/main/model.safetensors") and rep.path in out
    assert not any("pytorch_model.bin" in p for _, p in hub.requests)  # safetensors first, as timm does


def test_zoo_cli_list_and_download_report_args_ratios(hub, layouts, capsys):
    """``download`` prints the ratios read from the checkpoint's args (the 448 release's file says
    kmr0.25, its folder kmr0.75) and the reported number; ``list`` shows it cached."""
    spec = _serve(hub, "zoo", "crossmae_pretrain", layouts["crossmae_pretrain"])
    zoo.main(["download", spec[4:]])
    out = capsys.readouterr().out
    assert "format crossmae_pretrain" in out and "mask ratio 0.75, prediction ratio 0.25" in out
    assert str(zoo.REGISTRY["crossmae_vit_base_448"].reported_ft_top1) in out
    zoo.main(["list"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert set(rows) == set(zoo.REGISTRY)
    assert rows["crossmae_vit_base_448"][7] == "yes" and rows["crossmae_vit_base"][7] == "no"


def test_registry_notes_every_folder_file_prediction_ratio_disagreement():
    names = {"mae_vit_base", "mae_vit_large", "mae_vit_huge", "crossmae_vit_small", "crossmae_vit_base",
             "crossmae_vit_base_448", "crossmae_vit_large", "crossmae_vit_huge"}
    assert set(zoo.REGISTRY) == names | {f"{n}_ft" for n in names}
    for e in zoo.REGISTRY.values():
        assert zoo.REGISTRY[e.pretrained].method == e.method if e.finetuned else e.pretrained is None
        if e.method == "crossmae":
            _, file, _ = zoo._split_hf(e.uri)
            folder, name = file.split("/")
            kmr = [re.search(r"kmr([\d.]+?)-", s).group(1) for s in (folder + "-", name)]
            assert ("kmr" in e.notes and "file name" in e.notes) == (kmr[0] != kmr[1]), e.name


# --------------------------------------------------------------------------------------------------
# offline, no network, truncated, altered, pinned
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["zoo", "http"])
def test_offline_uncached_names_url_and_cache_path(hub, layouts, capsys, monkeypatch, scheme):
    spec = _serve(hub, scheme, "crossmae_pretrain", layouts["crossmae_pretrain"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _exit2(backbone_main, ["inspect", spec], capsys)
    r = zoo._remotes(spec)[0]
    url = ("https://huggingface.co/longlian/CrossMAE/resolve/main/" + zoo._split_hf(zoo.REGISTRY[spec[4:]].uri)[1]
           if scheme == "zoo" else spec)
    assert "offline" in msg and f"download {url} and put it at {r.cache_path}" in msg
    assert hub.requests == [] and _files(hub.cache) == []
    # putting the file there by hand, as the message says, makes it load offline
    r.cache_path.parent.mkdir(parents=True)
    r.cache_path.write_bytes(layouts["crossmae_pretrain"])
    _, rep = load_encoder_state_dict(spec)
    assert rep.format == "crossmae_pretrain" and hub.requests == []


def test_cached_file_used_offline_and_with_no_network(hub, layouts, monkeypatch):
    spec = _serve(hub, "zoo", "mae_encoder", layouts["mae_encoder"])
    sha = load_encoder_state_dict(spec)[1].sha256
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CROSSMAE_ZOO_MIRROR", "http://127.0.0.1:9")  # nothing listens there
    _, rep = load_encoder_state_dict(spec)
    assert rep.sha256 == sha and rep.format == "mae_encoder" and rep.meta["method"] == "mae"


def test_no_network_uncached_is_one_line(hub, layouts, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # connection refused
    msg = _exit2(backbone_main, ["inspect", "hf://testorg/tiny/w.pth"], capsys)
    assert "cannot reach http://127.0.0.1:9/testorg/tiny/resolve/main/w.pth" in msg
    assert f"put it at {hub.cache / 'hf/testorg/tiny/main/w.pth'}" in msg and _files(hub.cache) == []


@pytest.mark.parametrize("scheme,mode,expect", [
    ("hf", "short", r"truncated download from .* refused: Consistency check failed"),
    ("http", "drop", r"truncated download from .* refused \(connection closed early"),
    ("http", "short", r"download from .* refused: not a readable torch checkpoint \(truncated or corrupt\?\)"),
    ("hf", "alter", r"refused: sha256 \w+… differs from the Hub's \(LFS ETag\)"),
    ("zoo", "alter", r"refused: corrupt checkpoint \(CRC error in archive/data/\d+\)"),  # MAE: a plain URL
])
def test_truncated_or_altered_download_refused_and_nothing_cached(hub, layouts, capsys, scheme, mode, expect):
    layout = "mae_finetune" if scheme == "zoo" else "crossmae_pretrain"
    spec = _serve(hub, scheme, layout, layouts[layout], mode)
    msg = _exit2(backbone_main, ["inspect", spec], capsys)
    assert re.search(expect, msg), msg
    assert msg.startswith(f"error: --backbone {spec}: ")
    assert _files(hub.cache) == []  # no partial / temporary / refused file stays


def test_pinned_sha_refuses_a_different_later_file(hub, layouts, capsys):
    spec = _serve(hub, "zoo", "crossmae_finetune", layouts["crossmae_finetune"])
    path = Path(load_encoder_state_dict(spec)[1].path)
    pin = path.with_name(path.name + zoo.PIN_SUFFIX)
    # the file changes on the server (same layout, other weights): a re-download must match the pin
    path.unlink()
    _serve(hub, "zoo", "crossmae_finetune", layouts["mae_finetune"])
    msg = _exit2(zoo.main, ["download", "crossmae_vit_base_ft"], capsys)
    assert "differs from the one pinned at first download" in msg and str(pin) in msg
    assert _files(hub.cache) == [pin]
    # a cached file altered on disk is refused, not loaded
    path.write_bytes(layouts["crossmae_finetune"][:-10])
    msg = _exit2(backbone_main, ["inspect", spec], capsys)
    assert f"{path}: cached file has" in msg and "pinned at first download" in msg


@pytest.mark.parametrize("spec,msg", [
    ("zoo:mae_vit_gigantic", "zoo:mae_vit_gigantic: unknown checkpoint name (known: mae_vit_base,"),
    ("hf://only-owner/file.pth", "hf://only-owner/file.pth: expected hf://OWNER/REPO/PATH[@REVISION]"),
    ("timm:vit_base_patch16_224.no_such_tag", "has no pretrained config 'vit_base_patch16_224.no_such_tag' (Invalid pretrained tag (no_such_tag)"),
])
def test_bad_uris_are_one_line_errors(hub, capsys, spec, msg):
    assert msg in _exit2(backbone_main, ["inspect", spec], capsys)
    assert hub.requests == [] and _files(hub.cache) == []


def test_suite_plan_accepts_uris_without_downloading(hub, tmp_path):
    from benchmarks.suites import get_suite
    from crossmae.utils import UserError
    from slurm.submit import plan
    specs = plan(get_suite("smoke"), tmp_path / "out", backbones={"mae": "zoo:mae_vit_base"})
    assert specs and all(s.backbone == "zoo:mae_vit_base" and s.arch == "vit_base_patch16" for s in specs)
    argv = specs[0].argv()
    assert argv[argv.index("--backbone") + 1] == "zoo:mae_vit_base"
    with pytest.raises(UserError, match="zoo:nope: unknown checkpoint name"):
        plan(get_suite("smoke"), tmp_path / "out2", backbones={"x": "zoo:nope"})
    assert hub.requests == []


def test_task_metrics_json_records_uri_sha_and_zoo_entry(hub, layouts, data_root, tmp_path):
    """A real transfer run on ``--backbone zoo:…``: metrics.json keeps the URI, the downloaded file's
    sha256 and the registry entry (the leaderboard's reference value) next to the args' ratios."""
    from transfer import linprobe
    spec = _serve(hub, "zoo", "crossmae_pretrain", layouts["crossmae_pretrain"])
    out = tmp_path / "lp"
    linprobe.main(["--backbone", spec, "--config", "smoke", "--data-root", str(data_root), "--output-dir", str(out),
                   "--cfg-options", f"fast.cache_dir={tmp_path / 'feat'}", "protocol=fast"])
    m = json.loads((out / "metrics.json").read_text())
    entry = zoo.REGISTRY["crossmae_vit_base_448"]
    assert m["backbone"] == spec and m["backbone_sha256"] == hashlib.sha256(layouts["crossmae_pretrain"]).hexdigest()
    rep = m["backbone_report"]
    assert rep["source"] == spec and rep["sha256"] == m["backbone_sha256"]
    assert rep["zoo"]["reported_ft_top1"] == entry.reported_ft_top1 and rep["zoo"]["name"] == entry.name
    assert (rep["meta"]["method"], rep["meta"]["kept_mask_ratio"]) == ("crossmae", 0.25)


def test_offline_process_exits_2_with_one_line(tmp_path):
    """The real command in a process started with HF_HUB_OFFLINE=1 (huggingface_hub reads it at import);
    loading the file once put there is tested in-process above."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CROSSMAE_CACHE": str(tmp_path / "c"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_ENDPOINT", None)
    env.pop("CROSSMAE_ZOO_MIRROR", None)
    cmd = [sys.executable, "-m", "crossmae.backbone", "inspect", "zoo:crossmae_vit_base"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    entry = zoo.REGISTRY["crossmae_vit_base"]
    target = tmp_path / "c" / "hf" / "longlian" / "CrossMAE" / "main" / zoo._split_hf(entry.uri)[1]
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: --backbone zoo:crossmae_vit_base: not in the cache and offline (HF_HUB_OFFLINE): "
        f"download {entry.url} and put it at {target}")
    assert not (tmp_path / "c").exists() or _files(tmp_path / "c") == []


def test_readme_hub_link_is_the_zoo_entry_and_shares_its_cache(hub, layouts):
    """The CrossMAE README's links (https://huggingface.co/…/resolve/main/…?download=true) go through
    huggingface_hub (here: to HF_ENDPOINT) into the same cache file as zoo:NAME."""
    spec = _serve(hub, "zoo", "crossmae_pretrain", layouts["crossmae_pretrain"])
    link = zoo.REGISTRY[spec[4:]].url + "?download=true"
    _, rep = load_encoder_state_dict(link)
    assert rep.zoo["name"] == spec[4:] and rep.source == link and rep.format == "crossmae_pretrain"
    assert any(m == "HEAD" and "/resolve/" in p for m, p in hub.requests)  # the Hub protocol, not a bare GET
    n = len(hub.requests)
    _, rep2 = load_encoder_state_dict(spec)
    assert rep2.path == rep.path and len(hub.requests) == n
