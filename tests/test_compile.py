"""torch.compile options (crossmae.utils.maybe_compile): compiled == eager, checkpoints keep eager keys.

On CPU the tests use ``backend="aot_eager"`` (dynamo graph capture + AOTAutograd's joint
forward/backward graph, run without code generation): inductor's C++ code generation for even the
tiny model takes over two minutes cold on the 2-core CI machine. The inductor/Triton backend is
exercised on CUDA by tests/test_cuda.py and measured by ``benchmarks.pretrain_speed --compile``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from crossmae import pretrain
from crossmae.checkpoint import CheckpointManager, unwrap
from crossmae.models import create_model
from crossmae.utils import UserError, maybe_compile, safe_torch_load


def test_compiled_model_loss_and_gradients_equal_eager():
    torch.manual_seed(0)
    eager = create_model("crossmae_vit_tiny_patch16", img_size=32, decoder_depth=2)
    compiled = maybe_compile(copy.deepcopy(eager), "aot_eager")
    assert compiled._compiled_call_impl is not None
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 4, generator=g)
    le = eager(x, 0.75, 0.25, noise=noise)[0]
    lc = compiled(x, 0.75, 0.25, noise=noise)[0]
    le.backward()
    lc.backward()
    assert torch.allclose(le, lc, rtol=1e-6, atol=1e-7)
    n = 0
    for (name, pe), (name_c, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == name_c
        if pe.grad is None:
            assert pc.grad is None
            continue
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-5, atol=1e-7), name
        n += 1
    assert n > 20


def test_compile_keeps_state_dict_keys_and_checkpoints_clean(tmp_path):
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    keys = list(model.state_dict())
    assert maybe_compile(model, "aot_eager") is model
    assert list(model.state_dict()) == keys
    path = CheckpointManager(tmp_path).save({"model": unwrap(model).state_dict(), "optimizer": {}, "epoch": 0})
    assert not [k for k in safe_torch_load(path)["model"] if "_orig_mod" in k]
    wrapped = torch.compile(model, backend="aot_eager")   # the wrapper form, as users may write it
    assert "_orig_mod.cls_token" in wrapped.state_dict()
    assert unwrap(wrapped) is model and list(unwrap(wrapped).state_dict()) == keys


def test_maybe_compile_off_and_bad_values():
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    assert maybe_compile(model, False) is model and model._compiled_call_impl is None
    for bad in ("yes", 1.5, None, "no_such_backend"):
        with pytest.raises(UserError, match=r"config compile: expected True, False or a torch.compile backend"):
            maybe_compile(model, bad)
    assert model._compiled_call_impl is None


def test_pretrain_compile_option(data_root, tmp_path, capsys):
    """compile='aot_eager' trains to eager's loss (same steps, same RNG) and writes eager keys; a bad
    value stops before anything is written."""
    def argv(out, *opts):
        return ["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
                "--device", "cpu", "--cfg-options", "epochs=1", "data_subset=8", "batch_size=4",
                "total_batch_size=4", "num_workers=0", "tensorboard=False", "verify_images=False", *opts]

    eager = pretrain.main(argv(tmp_path / "eager"))
    comp = pretrain.main(argv(tmp_path / "comp", "compile=aot_eager"))
    assert abs(eager["metrics"]["loss"] - comp["metrics"]["loss"]) < 1e-5
    sd_e = safe_torch_load(eager["checkpoint"])["model"]
    sd_c = safe_torch_load(comp["checkpoint"])["model"]
    assert list(sd_e) == list(sd_c)
    assert max((sd_e[k].float() - sd_c[k].float()).abs().max().item() for k in sd_e) < 1e-5

    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        pretrain.main(argv(out, "compile=sometimes"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "smoke_crossmae.py: --cfg-options compile: expected True, False or a torch.compile backend name" in err
    assert "'sometimes'" in err and not out.exists()


def test_vitdet_compile_option_compiles_only_the_vit():
    from crossmae.utils import REPO_ROOT, load_config
    from transfer.vitdet.model import build_model
    cfg = load_config("smoke", None, REPO_ROOT / "configs" / "coco")
    assert cfg.model.compile is False
    plain = build_model(cfg.model.to_dict())
    comp = build_model(dict(cfg.model.to_dict(), compile="aot_eager"))
    assert plain.backbone.net._compiled_call_impl is None
    assert comp.backbone.net._compiled_call_impl is not None and comp._compiled_call_impl is None
    assert list(comp.state_dict()) == list(plain.state_dict())
    with pytest.raises(UserError, match="config model.compile: expected True, False"):
        build_model(dict(cfg.model.to_dict(), compile="sometimes"))
