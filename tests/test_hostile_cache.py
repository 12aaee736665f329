"""The download cache: the sha256 in a result is that of the bytes loaded, never a sidecar's word;
unusable cache folders, pin files and URLs are one line.

A real HTTP server on 127.0.0.1 serves a tiny MAE checkpoint; ``$CROSSMAE_CACHE`` is a fresh folder.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from crossmae import zoo
from crossmae.backbone import load_encoder_state_dict
from crossmae.backbone import main as backbone_main
from crossmae.utils import UserError


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, checkpoint bytes): a tiny MAE encoder-only checkpoint behind a loopback server."""
    from crossmae.models import create_model
    torch.manual_seed(0)
    sd = {k: v for k, v in create_model("mae_vit_tiny_patch16", img_size=64).state_dict().items()
          if not k.startswith(("decoder_", "mask_token"))}
    buf = io.BytesIO()
    torch.save({"model": sd}, buf)
    root = tmp_path_factory.mktemp("www")
    (root / "mae.pth").write_bytes(buf.getvalue())

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", buf.getvalue()
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSMAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def _one_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        backbone_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _downloaded(served, cache) -> tuple[str, Path, Path]:
    spec = f"{served[0]}/mae.pth"
    _, rep = load_encoder_state_dict(spec)
    path = Path(rep.path)
    assert rep.sha256 == hashlib.sha256(served[1]).hexdigest()
    return spec, path, path.with_name(path.name + zoo.PIN_SUFFIX)


def test_a_forged_pin_sha_is_never_reported_and_is_refused(served, cache, capsys):
    spec, path, pin = _downloaded(served, cache)
    p = json.loads(pin.read_text())
    p["sha256"] = "f" * 64  # size and mtime unchanged: only the sidecar lies
    pin.write_text(json.dumps(p))
    msg = _one_line(capsys, ["inspect", spec])
    assert f"{path}: refused: the sha256 of the bytes loaded, {hashlib.sha256(served[1]).hexdigest()[:12]}" in msg
    assert "ffffffffffff" in msg


def test_a_same_size_edit_with_its_mtime_restored_is_refused(served, cache, capsys):
    spec, path, pin = _downloaded(served, cache)
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the zip's end records: the file stays loadable-looking, same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = _one_line(capsys, ["inspect", spec])
    assert f"{path}: refused: the sha256 of the bytes loaded" in msg


def test_the_reported_sha_is_that_of_the_bytes_loaded(served, cache, tmp_path):
    _, path, _ = _downloaded(served, cache)
    local = tmp_path / "copy.pth"
    local.write_bytes(served[1])
    assert load_encoder_state_dict(local)[1].sha256 == hashlib.sha256(served[1]).hexdigest()


def test_cache_root_that_is_a_file_or_under_a_file_is_one_line(served, cache, capsys, monkeypatch, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for root in (f, f / "below"):
        monkeypatch.setenv("CROSSMAE_CACHE", str(root))
        msg = _one_line(capsys, ["inspect", f"{served[0]}/mae.pth"])
        assert "download cache folder" in msg and "CROSSMAE_CACHE" in msg
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_cache_root_not_writable_is_one_line(served, cache, capsys, monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("CROSSMAE_CACHE", str(ro))
    msg = _one_line(capsys, ["inspect", f"{served[0]}/mae.pth"])
    assert "permission denied" in msg


def test_pin_path_that_is_a_folder_is_one_line(served, cache, capsys):
    spec = f"{served[0]}/mae.pth"
    r = zoo._remotes(spec)[0]
    pin = r.cache_path.with_name(r.cache_path.name + zoo.PIN_SUFFIX)
    pin.mkdir(parents=True)
    msg = _one_line(capsys, ["inspect", spec])
    assert f"{pin}: is not a regular file" in msg
    assert not r.cache_path.exists()


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:99999/x.pth", "Port out of range"),
    ("http://[::1/x.pth", "Invalid IPv6 URL"),
    ("http://[::1", "Invalid IPv6 URL"),
])
def test_unparsable_urls_are_one_line_in_commands_and_in_suite_planning(cache, capsys, url, why, tmp_path):
    msg = _one_line(capsys, ["inspect", url])
    assert msg.startswith(f"error: --backbone {url}: not a valid URI") and why in msg
    with pytest.raises(UserError, match="not a valid URI"):
        zoo.validate_spec(url)
    from benchmarks.suites import get_suite
    from slurm.submit import plan
    with pytest.raises(UserError, match="not a valid URI"):
        plan(get_suite("smoke"), tmp_path / "suite", backbones={"x": url})


def test_cache_path_that_is_a_folder_is_one_line(served, cache, capsys):
    spec = f"{served[0]}/mae.pth"
    r = zoo._remotes(spec)[0]
    r.cache_path.mkdir(parents=True)
    msg = _one_line(capsys, ["inspect", spec])
    assert f"{r.cache_path}: cache path exists and is not a regular file" in msg
    assert r.cache_path.is_dir() and list(r.cache_path.iterdir()) == []
