"""Bad input is refused with ONE line and exit status 2 before any work, and nothing is written.

Covers (issue 9, "Bad input"): ``--cfg-options`` values of the wrong type or range and bad values in a
``--config FILE`` (checked once, in ``crossmae.utils.load_config``, for every command); malformed COCO
annotation entries; ``backbone export`` to a folder / an unwritable place and ``--img-size``/
``--input-size`` ≤ 0; integer / bool weights and wrongly shaped tensors in a checkpoint (refused instead
of cast / exported); truncated ADE20K JPEGs (strict decode, same pixels as mmcv's cv2 for good images);
``--stop-after`` ≤ 0; an iNat val json whose categories differ from train's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmae.utils import REPO_ROOT, UserError, load_config


def _fails(main, argv, capsys, *expected: str) -> str:
    """Run ``main(argv)`` in-process; assert exit status 2 and one ``error:`` line containing ``expected``."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for e in expected:
        assert e in err[0], err[0]
    return err[0]


def _tree(path: Path) -> dict:
    """Every file below ``path`` with its size and mtime (to show that nothing was written/changed)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))} \
        if Path(path).exists() else {}


# --------------------------------------------------------------------------------------------------
# 1. --cfg-options: type follows the preset's value, range by field name; --config FILE values
# --------------------------------------------------------------------------------------------------
def _opts(opts) -> list[str]:
    return ["--cfg-options", *opts] if opts else []


def _pretrain(out, data_root, *opts):
    from crossmae import pretrain
    return pretrain.main, ["--config", "smoke_crossmae", "--data-root", str(data_root), "--output-dir", str(out),
                           *_opts(opts)]


def _coco(out, data_root, *opts):
    from transfer import coco
    return coco.main, ["--config", "smoke", "--backbone", "none", "--data-root", str(data_root),
                       "--output-dir", str(out), *_opts(opts)]


def _ade20k(out, data_root, *opts):
    from transfer import ade20k
    return ade20k.main, ["--config", "smoke", "--backbone", "none", "--data-root", str(data_root),
                         "--output-dir", str(out), *_opts(opts)]


def _finetune(out, data_root, *opts, backbone=None):
    from transfer import finetune
    return finetune.main, ["--config", "smoke", "--backbone", str(backbone), "--data-root", str(data_root),
                           "--output-dir", str(out), *_opts(opts)]


def _inat_linprobe(out, data_root, *opts, backbone=None):
    from transfer import inat
    return inat.main, ["--config", "smoke", "--protocol", "linprobe", "--backbone", str(backbone),
                       "--data-root", str(data_root), "--output-dir", str(out), *_opts(opts)]


PRE = REPO_ROOT / "configs" / "pretrain" / "smoke_crossmae.py"
COCO = REPO_ROOT / "configs" / "coco" / "smoke.py"
ADE = REPO_ROOT / "configs" / "ade20k" / "smoke.py"
FT = REPO_ROOT / "configs" / "finetune" / "smoke.py"
INAT_LP = REPO_ROOT / "configs" / "inat" / "linprobe_smoke.py"

CFG_CASES = [
    # (command, override, expected message parts)
    (_pretrain, "epochs=abc", [f"{PRE}: --cfg-options epochs='abc': expected an integer >= 1", "got a string"]),
    (_pretrain, "epochs=2.5", ["--cfg-options epochs=2.5: expected an integer >= 1", "got a number"]),
    (_pretrain, "blr=abc", ["--cfg-options blr='abc': expected a number >= 0"]),
    (_pretrain, "blr=-0.1", ["--cfg-options blr=-0.1: expected a number >= 0"]),
    (_pretrain, "batch_size=0", ["--cfg-options batch_size=0: expected an integer >= 1"]),
    (_pretrain, "batch_size=-4", ["--cfg-options batch_size=-4: expected an integer >= 1"]),
    (_pretrain, "num_workers=-1", ["--cfg-options num_workers=-1: expected an integer >= 0"]),
    (_pretrain, "tensorboard=1", ["--cfg-options tensorboard=1: expected a boolean", "got an integer"]),
    (_pretrain, "model=3", ["--cfg-options model=3: expected a string", "got an integer"]),
    (_pretrain, "weight_decay=-0.05", ["--cfg-options weight_decay=-0.05: expected a number >= 0"]),
    (_coco, "train.max_iter=abc", [f"{COCO}: --cfg-options train.max_iter='abc': expected an integer >= 1"]),
    (_coco, "train.batch_size=0", ["--cfg-options train.batch_size=0: expected an integer >= 1"]),
    (_coco, "optim.lr=abc", ["--cfg-options optim.lr='abc': expected a number >= 0"]),
    (_coco, "data.flip_prob=1.5", ["--cfg-options data.flip_prob=1.5: expected a number in [0, 1]"]),
    (_ade20k, "schedule.max_iters=abc", [f"{ADE}: --cfg-options schedule.max_iters='abc': expected an integer >= 1"]),
    (_ade20k, "data.num_workers=-1", ["--cfg-options data.num_workers=-1: expected an integer >= 0"]),
    (_ade20k, "data.crop_size=(0,64)", ["--cfg-options data.crop_size=(0, 64): expected a list of integers >= 1"]),
    (_finetune, "blr=abc", [f"{FT}: --cfg-options blr='abc': expected a number >= 0"]),
    (_finetune, "epochs=abc", ["--cfg-options epochs='abc': expected an integer >= 1"]),
    (_finetune, "batch_size=0", ["--cfg-options batch_size=0: expected an integer >= 1"]),
    (_finetune, "mixup=True", ["--cfg-options mixup=True: expected a number >= 0", "got a boolean"]),
    (_inat_linprobe, "fast.blrs=[0.1,-1.0]", [f"{INAT_LP}: --cfg-options fast.blrs=[0.1, -1.0]: expected a list of numbers > 0"]),
    (_inat_linprobe, "fast.epochs=-3", ["--cfg-options fast.epochs=-3: expected an integer >= 1 (or None)"]),
    # the run vocabulary (CONTRACTS.md): an old name of a run concept is refused naming the new key
    (_pretrain, "log_freq=5", [f"{PRE}: --cfg-options log_freq was renamed: use log_period"]),
    (_pretrain, "save_freq=2", ["--cfg-options save_freq was renamed: use checkpoint_period"]),
    (_coco, "train.batch_size_per_device=1", ["--cfg-options train.batch_size_per_device was renamed: use train.batch_size"]),
    (_ade20k, "train.log_interval=1", ["--cfg-options train.log_interval was renamed: use train.log_period"]),
    (_ade20k, "train.val_interval=5", ["--cfg-options train.val_interval was renamed: use train.eval_period"]),
    (_finetune, "save_interval=5", ["--cfg-options save_interval was renamed: use snapshot_period"]),
    (_inat_linprobe, "fast.checkpoint_interval=1", ["fast.checkpoint_interval was renamed: use fast.checkpoint_period"]),
]


@pytest.mark.parametrize("command, option, expected", CFG_CASES,
                         ids=[f"{c.__name__[1:]}:{o}" for c, o, _ in CFG_CASES])
def test_bad_cfg_option_fails_before_any_work(tmp_path, data_root, tiny_mae_official, capsys, command, option,
                                             expected):
    out = tmp_path / "out"
    kw = {"backbone": tiny_mae_official} if command in (_finetune, _inat_linprobe) else {}
    main, argv = command(out, data_root, option, **kw)
    _fails(main, argv, capsys, *expected)
    assert not out.exists()


def test_bad_value_in_a_config_file_is_refused(tmp_path, data_root, capsys):
    cfg = tmp_path / "mine.py"
    cfg.write_text(f"_base_ = ['{PRE}']\nbatch_size = 0\n")
    out = tmp_path / "out"
    from crossmae import pretrain
    _fails(pretrain.main, ["--config", str(cfg), "--data-root", str(data_root), "--output-dir", str(out)], capsys,
           f"{cfg}: config batch_size=0: expected an integer >= 1")
    assert not out.exists()
    cfg.write_text(f"_base_ = ['{PRE}']\nsave_freq = 5\n")   # an old name in a file
    _fails(pretrain.main, ["--config", str(cfg), "--data-root", str(data_root), "--output-dir", str(out)], capsys,
           f"{cfg}: config save_freq was renamed: use checkpoint_period")
    cfg.write_text(f"_base_ = ['{FT}']\naug = dict(reprob=2.0)\n")
    with pytest.raises(UserError, match=r"mine\.py: config aug\.reprob=2\.0: expected a number in \[0, 1\]"):
        load_config(cfg)


def test_sensible_overrides_and_every_preset_are_accepted():
    """The checks must not refuse what the presets and docs use: float fields take ints, None where the
    preset is None or the field documents it, strings, tuples for lists."""
    for f in sorted((REPO_ROOT / "configs").glob("*/*.py")):
        load_config(f)
    cfg = load_config(FT, ["mixup=0", "aug.auto_augment=None", "lr=0.1", "clip_grad=1.0", "data.root=places"])
    assert (cfg.mixup, cfg.aug.auto_augment, cfg.lr, cfg.clip_grad) == (0, None, 0.1, 1.0)
    cfg = load_config(ADE, ["model.layer_scale_init=None", "test.aug_ratios=(0.5,1.0)", "test.max_images=2"])
    assert cfg.model.layer_scale_init is None and tuple(cfg.test.aug_ratios) == (0.5, 1.0)
    cfg = load_config(PRE, ["kept_mask_ratio=None", "data_subset=16", "amp=fp16"])
    assert cfg.kept_mask_ratio is None and cfg.data_subset == 16 and cfg.amp == "fp16"


# --------------------------------------------------------------------------------------------------
# 2. COCO annotation entries
# --------------------------------------------------------------------------------------------------
def _coco_json(data_root: Path, tmp_path: Path, edit) -> Path:
    d = json.loads((data_root / "coco" / "annotations" / "instances_val2017.json").read_text())
    edit(d)
    p = tmp_path / "instances_val2017.json"
    p.write_text(json.dumps(d))
    return p


def _del(entry: dict, key: str) -> dict:
    entry.pop(key)
    return entry


COCO_CASES = {
    "image without id": (lambda d: _del(d["images"][2], "id"), "images[2] (id None): needs an integer 'id'"),
    "image without height": (lambda d: _del(d["images"][1], "height"), "needs a positive integer 'height'"),
    "annotation without id": (lambda d: _del(d["annotations"][3], "id"), "annotations[3]: needs an 'id'"),
    "annotation without bbox": (lambda d: _del(d["annotations"][4], "bbox"), "needs a 'bbox' [x, y, width, height]"),
    "string bbox": (lambda d: d["annotations"][5].update(bbox="10 20 30 40"),
                    "bbox '10 20 30 40' is not four numbers"),
    "bbox of three numbers": (lambda d: d["annotations"][5].update(bbox=[1.0, 2.0, 3.0]), "is not four numbers"),
    "negative box width": (lambda d: d["annotations"][6].update(bbox=[10.0, 10.0, -5.0, 8.0]),
                           "has a negative width or height"),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_malformed_coco_entry_names_file_and_entry(tmp_path, data_root, case):
    from transfer.vitdet.data import CocoInstances
    edit, expected = COCO_CASES[case]
    p = _coco_json(data_root, tmp_path, edit)
    d = json.loads(p.read_text())
    with pytest.raises(UserError) as ei:
        CocoInstances(p, data_root / "coco" / "val2017", train=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ") and expected in msg, msg
    if case.startswith(("annotation", "string", "bbox", "negative")) and case != "annotation without id":
        i = int(msg.split("annotations[")[1].split("]")[0])
        assert f"(id {d['annotations'][i]['id']})" in msg


def test_coco_command_refuses_negative_val_box_before_writing(tmp_path, data_root, capsys):
    root = tmp_path / "data"
    (root / "coco" / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "coco" / split).symlink_to(data_root / "coco" / split)
    shutil.copy(data_root / "coco" / "annotations" / "instances_train2017.json", root / "coco" / "annotations")
    bad = _coco_json(data_root, root / "coco" / "annotations",
                     lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, -3.0, 4.0]))
    out = tmp_path / "out"
    main, argv = _coco(out, root, "train.max_iter=1")
    _fails(main, argv, capsys, f"{bad}: annotations[0]", "negative width")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 3. backbone export target, image sizes
# --------------------------------------------------------------------------------------------------
def test_export_to_a_folder_is_refused(tmp_path, tiny_mae_official, capsys):
    from crossmae import backbone
    target = tmp_path / "exports"
    target.mkdir()
    _fails(backbone.main, ["export", str(tiny_mae_official), str(target)], capsys,
           f"{target}: is a folder; give the exported encoder's file name")
    assert list(target.iterdir()) == []


def test_export_below_a_file_is_refused(tmp_path, tiny_mae_official, capsys):
    from crossmae import backbone
    f = tmp_path / "notes.txt"
    f.write_text("x")
    before = _tree(tmp_path)
    _fails(backbone.main, ["export", str(tiny_mae_official), str(f / "sub" / "enc.pth")], capsys,
           f"{f / 'sub' / 'enc.pth'}: export target lies under {f}, which is not a folder")
    assert _tree(tmp_path) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_export_where_nothing_can_be_created_is_refused(tiny_mae_official, capsys):
    """/proc refuses new files even to root (a chmod'ed folder would not stop root)."""
    from crossmae import backbone
    target = Path("/proc/crossmae_export_test/enc.pth")
    msg = _fails(backbone.main, ["export", str(tiny_mae_official), str(target)], capsys, f"{target}: ")
    assert "export target is not writable" in msg
    assert not target.parent.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_export_into_read_only_folder_is_refused(tmp_path, tiny_mae_official, capsys):
    from crossmae import backbone
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(backbone.main, ["export", str(tiny_mae_official), str(ro / "enc.pth")], capsys,
               f"{ro / 'enc.pth'}: export target is not writable ({ro}: ")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("size", ["0", "-32"])
def test_non_positive_img_size_is_refused(tiny_mae_official, capsys, size):
    from crossmae import backbone
    _fails(backbone.main, ["inspect", str(tiny_mae_official), "--img-size", size], capsys,
           f"--img-size {size}: expected a positive number of pixels")
    from crossmae.backbone import BackboneLoadError, load_encoder_state_dict
    with pytest.raises(BackboneLoadError, match=f"image size {size}: expected a positive number of pixels"):
        load_encoder_state_dict(tiny_mae_official, img_size=int(size))


def test_visualize_non_positive_input_size_is_refused(tmp_path, tiny_mae_official, capsys):
    from crossmae import visualize
    out = tmp_path / "fig"
    _fails(visualize.main, ["--mae", str(tiny_mae_official), "--input-size", "0", "--output-dir", str(out)], capsys,
           "--input-size 0: expected a positive number of pixels")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 4. checkpoints that used to load (or export) silently
# --------------------------------------------------------------------------------------------------
def _edited_ckpt(src: Path, dst: Path, edit) -> Path:
    with torch.serialization.safe_globals([argparse.Namespace]):
        ck = torch.load(src, weights_only=True)
    edit(ck["model"])
    torch.save(ck, dst)
    return dst


BAD_TENSORS = {
    "int weights": (lambda sd: sd.update({"blocks.1.mlp.fc1.weight": (sd["blocks.1.mlp.fc1.weight"] * 100).long()}),
                    "blocks.1.mlp.fc1.weight has dtype int64; expected floating-point weights"),
    "bool weights": (lambda sd: sd.update({"blocks.0.norm1.weight": sd["blocks.0.norm1.weight"] > 0}),
                     "blocks.0.norm1.weight has dtype bool; expected floating-point weights"),
    "narrow mlp": (lambda sd: sd.update({"blocks.2.mlp.fc1.weight": sd["blocks.2.mlp.fc1.weight"][:200],
                                         "blocks.2.mlp.fc1.bias": sd["blocks.2.mlp.fc1.bias"][:200],
                                         "blocks.2.mlp.fc2.weight": sd["blocks.2.mlp.fc2.weight"][:, :200]}),
                   "blocks.2.mlp.fc1.weight has shape (200, 64), expected (256, 64) for vit_tiny_patch16"),
    "transposed proj": (lambda sd: sd.update({"blocks.3.attn.qkv.weight": sd["blocks.3.attn.qkv.weight"].t().contiguous()}),
                        "blocks.3.attn.qkv.weight has shape (64, 192), expected (192, 64) for vit_tiny_patch16"),
    "short norm": (lambda sd: sd.update({"blocks.0.norm2.bias": sd["blocks.0.norm2.bias"][:32]}),
                   "blocks.0.norm2.bias has shape (32,), expected (64,)"),
    "cls token": (lambda sd: sd.update({"cls_token": sd["cls_token"].reshape(1, 64)}),
                  "cls_token has shape (1, 64), expected (1, 1, 64)"),
    "pos_embed batch": (lambda sd: sd.update({"pos_embed": sd["pos_embed"].repeat(2, 1, 1)}),
                        "pos_embed has shape (2, 17, 64), expected (1, 1+N, 64)"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_weight_tensors_refused_by_inspect_and_export(tmp_path, tiny_mae_official, capsys, case):
    from crossmae import backbone
    edit, expected = BAD_TENSORS[case]
    ck = _edited_ckpt(tiny_mae_official, tmp_path / "bad.pth", edit)
    _fails(backbone.main, ["inspect", str(ck)], capsys, f"{ck}: {expected}")
    out = tmp_path / "enc.pth"
    _fails(backbone.main, ["export", str(ck), str(out)], capsys, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


# --------------------------------------------------------------------------------------------------
# 5. ADE20K: strict decode, same pixels as before for good images
# --------------------------------------------------------------------------------------------------
ADE_ROOTS = ("ade20k/ADEChallengeData2016", "coco_semseg/ADEChallengeData2016")


def test_ade20k_decoder_keeps_mmcv_pixels_on_bundled_images(data_root):
    """mmcv's LoadImageFromFile is cv2.imread(IMREAD_COLOR) (BGR uint8); the strict decoder must give
    the same arrays for every good bundled image."""
    import cv2
    from transfer.seg.data import read_bgr
    files = [f for r in ADE_ROOTS if (data_root / r).is_dir() for f in sorted((data_root / r).rglob("*.jpg"))]
    assert len(files) >= 20
    for f in files:
        ours, ref = read_bgr(f), cv2.imread(str(f), cv2.IMREAD_COLOR)
        assert ours.dtype == np.uint8 and ours.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(ours, ref, err_msg=str(f))


def test_ade20k_truncated_jpeg_is_an_error_not_grey(tmp_path, data_root):
    from transfer.seg.data import SegTestDataset, load_pair, scan_split
    src = data_root / ADE_ROOTS[1]
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(src / "annotations" / "validation", root / "annotations" / "validation")
    (root / "images" / "validation").mkdir(parents=True)
    for f in sorted((src / "images" / "validation").glob("*.jpg")):
        shutil.copy(f, root / "images" / "validation" / f.name)
    victim = sorted((root / "images" / "validation").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    sample = next(s for s in scan_split(root, "validation") if Path(s.image) == victim)
    with pytest.raises(UserError) as ei:
        load_pair(sample, 80)
    assert str(ei.value).startswith(f"{victim}: cannot decode image") and "\n" not in str(ei.value)
    ds = SegTestDataset(root, "validation", 80, (256, 64))
    i = next(i for i, s in enumerate(ds.samples) if Path(s.image) == victim)
    with pytest.raises(UserError, match="cannot decode image"):
        ds[i]


# --------------------------------------------------------------------------------------------------
# 6. ade20k --stop-after
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["-5", "0"])
def test_ade20k_stop_after_must_be_positive(tmp_path, data_root, capsys, n):
    from transfer import ade20k
    out = tmp_path / "out"
    _fails(ade20k.main, ["--config", "smoke", "--backbone", "none", "--data-root", str(data_root),
                         "--output-dir", str(out), "--stop-after", n], capsys,
           f"--stop-after {n}: expected a positive number of iterations")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 7. iNat val categories matched by id and name
# --------------------------------------------------------------------------------------------------
def _inat_root(tmp_path: Path, data_root: Path, edit) -> Path:
    root = tmp_path / "data" / "inat2019"
    root.mkdir(parents=True)
    (root / "train_val2019").symlink_to(data_root / "inat2019" / "train_val2019")
    shutil.copy(data_root / "inat2019" / "train2019.json", root)
    d = json.loads((data_root / "inat2019" / "val2019.json").read_text())
    edit(d)
    (root / "val2019.json").write_text(json.dumps(d))
    return root


def _rename(d):
    d["categories"][1]["name"] = "Vespa crabro"


def _reid(d):
    for c in d["categories"]:
        c["id"] += 10
    for a in d["annotations"]:
        a["category_id"] += 10


def _swap(d):
    a, b = d["categories"][0], d["categories"][1]
    a["name"], b["name"] = b["name"], a["name"]


@pytest.mark.parametrize("edit, expected", [
    (_rename, "at class 1: val has id 1 'Vespa crabro', train has id 1 'Apis mellifera'"),
    (_reid, "at class 0: val has id 10 'Formicidae', train has id 0 'Formicidae'"),
    (_swap, "at class 0: val has id 0 'Apis mellifera', train has id 0 'Formicidae'"),
], ids=["renamed", "other ids", "swapped names"])
def test_inat_val_categories_must_match_train_by_id_and_name(tmp_path, data_root, edit, expected):
    from transfer.classification.data import load_train_val
    root = _inat_root(tmp_path, data_root, edit)
    with pytest.raises(UserError) as ei:
        load_train_val(dict(type="inat2019", root="inat2019", num_classes=2), root.parent)
    msg = str(ei.value)
    assert msg.startswith(f"{root / 'val2019.json'}: categories differ from the train split's") and expected in msg, msg


def test_inat_command_refuses_renamed_val_categories(tmp_path, data_root, tiny_mae_official, capsys):
    root = _inat_root(tmp_path, data_root, _rename)
    out = tmp_path / "out"
    main, argv = _inat_linprobe(out, root.parent, backbone=tiny_mae_official)
    _fails(main, argv, capsys, f"{root / 'val2019.json'}: categories differ", "'Vespa crabro'")
    assert not out.exists()  # the data is read before the run folder is made (run lifecycle)


# --------------------------------------------------------------------------------------------------
# 8. an output path that cannot be written, for the commands outside the run lifecycle (the six task
#    commands are covered in test_lifecycle.py): one check, crossmae.utils.check_writable
# --------------------------------------------------------------------------------------------------
_OUTPUT_COMMANDS = [
    ("slurm.submit", ["--suite", "smoke"], "--output-dir", "run"),
    ("slurm.main_job", [], "--output-dir", "run"),
    ("slurm.selftest", [], "--output-dir", "run"),
    ("crossmae.visualize", [], "--output-dir", "figs"),
    ("benchmarks.linprobe_speed", [], "--output-dir", "bench"),
    ("benchmarks.coco_paste", [], "--out", "bench"),
    ("benchmarks.pretrain_speed", [], "--out", "speed.json"),
    ("benchmarks.bootstrap_speed", [], "--out", "speed.json"),
    ("benchmarks.loader_speed", [], "--out", "speed.json"),
]


@pytest.mark.parametrize("module, args, flag, name", _OUTPUT_COMMANDS, ids=[c[0] for c in _OUTPUT_COMMANDS])
def test_output_path_under_a_file_is_refused_before_any_work(tmp_path, capsys, module, args, flag, name):
    import importlib
    main = importlib.import_module(module).main
    f = tmp_path / "notes.txt"
    f.write_text("x")
    before = _tree(tmp_path)
    target = f / name
    _fails(main, [*args, flag, str(target)], capsys, f"{target}: {flag} lies under {f}, which is not a folder")
    assert _tree(tmp_path) == before
