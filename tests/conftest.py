"""Shared fixtures: the real data root and tiny pretrained checkpoints in the official layouts."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from crossmae.utils import resolve_data_root



@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory) -> Path:
    """Every test (and every command it starts) keeps its dataset indexes in one fresh cache folder
    (``$CROSSMAE_INDEX_CACHE``), never in the user's ``~/.cache``."""
    folder = tmp_path_factory.mktemp("index-cache")
    old = os.environ.get("CROSSMAE_INDEX_CACHE")
    os.environ["CROSSMAE_INDEX_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CROSSMAE_INDEX_CACHE", None)
    else:
        os.environ["CROSSMAE_INDEX_CACHE"] = old


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The datasets root (``$CROSSMAE_DATA_ROOT`` or ``../shared/data``): real mini subsets."""
    return resolve_data_root(os.environ.get("CROSSMAE_DATA_ROOT"))


def _official_ckpt(path: Path, name: str, seed: int, **kw) -> Path:
    from crossmae.models import create_model
    torch.manual_seed(seed)
    model = create_model(name, img_size=64, **kw)
    args = argparse.Namespace(model=name, input_size=64, mask_ratio=0.75,
                              kept_mask_ratio=0.25 if name.startswith("crossmae") else None,
                              decoder_depth=len(model.decoder_blocks), epochs=1, norm_pix_loss=True,
                              weight_fm=getattr(model, "weight_fm", False), use_input=kw.get("use_input", False))
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 0, "scaler": None, "args": args}, path)
    return path


@pytest.fixture(scope="session")
def tiny_mae_official(tmp_path_factory) -> Path:
    """A randomly initialised tiny MAE (64 px) saved in the official MAE checkpoint layout."""
    return _official_ckpt(tmp_path_factory.mktemp("ckpt") / "mae_tiny.pth", "mae_vit_tiny_patch16", 0)


@pytest.fixture(scope="session")
def tiny_crossmae_official(tmp_path_factory) -> Path:
    """A randomly initialised tiny CrossMAE (inter-block attention, no final norm), official layout."""
    return _official_ckpt(tmp_path_factory.mktemp("ckpt") / "crossmae_tiny.pth", "crossmae_vit_tiny_patch16", 1,
                          use_input=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one intra-op thread: the suite's tiny models are several times faster so
    on the 2-core CI machine (thread start-up dominates their small matmuls)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_crossmae_ckpt(tmp_path_factory, data_root) -> Path:
    """A tiny CrossMAE (64 px, γ 0.25, inter-block attention) pretrained for one epoch on the real
    ImageNet images by ``crossmae.pretrain`` itself: the official checkpoint layout it writes."""
    from crossmae import pretrain
    out = tmp_path_factory.mktemp("pretrain")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = pretrain.main(["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
                           "--cfg-options", "epochs=1", "data_subset=32", "batch_size=8", "total_batch_size=8",
                           "num_workers=0", "tensorboard=False", "verify_images=False"])
    finally:
        torch.set_num_threads(n)
    return Path(m["checkpoint"])


class StepCounter:
    """Counts ``optimizer.step()`` calls made in this process (torch's global optimizer step hook), so a
    resume test can check how much training the resumed command really did, whatever its loop is."""

    def __init__(self):
        self.n = 0

    def __call__(self, optimizer, args, kwargs):
        self.n += 1

    def reset(self) -> None:
        self.n = 0


@pytest.fixture
def optimizer_steps():
    """A :class:`StepCounter` active for the test (``.n`` steps so far, ``.reset()``)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    counter = StepCounter()
    handle = register_optimizer_step_post_hook(counter)
    yield counter
    handle.remove()


@pytest.fixture
def user_error(capsys):
    """``user_error(main, argv)`` runs a command expecting bad input: exit status 2 and exactly one
    ``error: …`` line, the last one on stderr (log lines may precede it). Returns that line."""
    def check(main, argv) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        errors = [ln for ln in err if ln.startswith("error: ")]
        assert len(errors) == 1 and err[-1] == errors[0], err
        return errors[0]
    return check
