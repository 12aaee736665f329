"""benchmarks/gpu_check.sh on a machine without CUDA: its option checks and its no-GPU exit.

The GPU steps themselves run only on a GPU machine (docs/benchmarks.md, "First GPU session").
"""
from __future__ import annotations

import json
import os
import subprocess

from crossmae.utils import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args, env_extra=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env_extra or {}))   # no GPU even on a GPU machine
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_without_cuda_exits_2_with_message_and_summary(tmp_path):
    out = tmp_path / "gc"
    r = _run("--out", str(out))
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "no CUDA GPU" in errs[0] and "nothing measured" in errs[0]
    assert "Traceback" not in r.stderr + r.stdout
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["status"] == "no_cuda" and doc["steps"]["env"]["status"] == "no_cuda"
    assert "no CUDA GPU" in (out / "gpu_check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_bad_options_exit_2_before_writing(tmp_path):
    out = tmp_path / "gc"
    for args, msg in [(["--only", "pretrain,warp"], "--only names unknown step 'warp'"),
                      (["--budget", "5m"], "--budget 5m is not a whole number of seconds"),
                      (["--fast"], "unknown option --fast")]:
        r = _run(*args, "--out", str(out))
        assert r.returncode == 2
        assert r.stderr.startswith(f"error: gpu_check.sh: {msg}"), r.stderr
        assert r.stderr.count("\n") == 1
        assert not out.exists()
