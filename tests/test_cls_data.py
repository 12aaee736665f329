"""Classification loaders on the real mini datasets, category-id mapping, and every bad-input case."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


from crossmae.utils import UserError
from transfer.classification.data import (eval_transform, load_imagefolder, load_inat2019, load_places365, load_split,
                               load_train_val, places_categories)


# ------------------------------------------------------------------ real layouts
def test_inat_real_layout_and_mapping(data_root):
    tr = load_inat2019(data_root / "inat2019", "train")
    va = load_inat2019(data_root / "inat2019", "val")
    assert (len(tr.samples), len(va.samples)) == (120, 40)
    assert tr.classes == ["Formicidae", "Apis mellifera"]
    # independent check: the official layout puts each image under train_val2019/<super>/<category_id>/
    for data in (tr, va):
        ids = data.extra["category_ids"]
        for path, label in data.samples:
            assert int(Path(path).parent.name) == ids[label]
            assert Path(path).is_file()
    assert {y for _, y in tr.samples} == {0, 1}
    assert tr.extra["taxonomy"][1]["genus"] == "Apis"


def _inat_copy(data_root: Path, tmp: Path, edit) -> Path:
    """A temporary iNat data_root: the real image folder symlinked (never copied) + edited json files."""
    dst = tmp / "inat"
    dst.mkdir()
    os.symlink(data_root / "inat2019" / "train_val2019", dst / "train_val2019")
    for name in ("train2019.json", "val2019.json"):
        d = json.loads((data_root / "inat2019" / name).read_text())
        edit(d)
        (dst / name).write_text(json.dumps(d))
    return dst


def test_inat_noncontiguous_category_ids(data_root, tmp_path):
    remap = {0: 17, 1: 5}

    def edit(d):
        for c in d["categories"]:
            c["id"] = remap[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = remap[a["category_id"]]

    r = _inat_copy(data_root, tmp_path, edit)
    tr = load_inat2019(r, "train")
    assert tr.extra["category_ids"] == [5, 17]
    assert tr.classes == ["Apis mellifera", "Formicidae"]  # index = rank of the id
    for path, label in tr.samples:  # folder name holds the ORIGINAL id: 1 (bees) -> id 5 -> index 0
        assert label == {1: 0, 0: 1}[int(Path(path).parent.name)]


def test_places_real_layout_and_mapping(data_root):
    r = data_root / "places365"
    names = places_categories(r)
    assert len(names) == 365 and names[0] == "/a/airfield"
    tr = load_places365(r, "train")
    va = load_places365(r, "val")
    assert (len(tr.samples), len(va.samples)) == (192, 192)
    assert tr.num_classes == va.num_classes == 365
    # independent parse of the official files
    cat = {int(l.split()[1]): l.split()[0] for l in (r / "categories_places365.txt").read_text().splitlines() if l.strip()}
    for (path, label), line in zip(tr.samples, (r / "places365_train_standard.txt").read_text().split("\n")):
        rel, lab = line.split()
        assert label == int(lab) and path.endswith(rel) and rel.startswith(cat[label] + "/")
        assert path.startswith(str(r / "data_256"))
    first = (r / "places365_val.txt").read_text().split("\n")[0].split()
    assert va.samples[0] == (str(r / "val_256" / first[0]), int(first[1]))
    assert len({y for _, y in tr.samples}) == 96


def test_imagefolder_real_images(data_root, tmp_path):
    imnet = load_imagefolder(data_root / "imagenet", "train")
    assert imnet.num_classes == 200 and len(imnet.samples) == 200
    assert imnet.classes == sorted(imnet.classes)
    # ImageFolder with train/ and val/: real iNat images, symlinked by class
    inat = load_inat2019(data_root / "inat2019", "train")
    for split, sl in (("train", slice(0, None, 2)), ("val", slice(1, None, 2))):
        for i, (p, y) in enumerate(inat.samples[sl]):
            d = tmp_path / "if" / split / ["ants", "bees"][y]
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(p, d / f"{i}.jpg")
    tr, va = load_train_val(dict(type="imagefolder", root="if", num_classes=2), tmp_path)
    assert tr.classes == va.classes == ["ants", "bees"]
    assert len(tr.samples) == len(va.samples) == 60
    with pytest.raises(UserError, match=r"imagenet/val: ImageFolder split folder not found"):
        load_train_val(dict(type="imagefolder", root="imagenet"), data_root)


def test_eval_transform_is_resize_centercrop():
    from PIL import Image
    t = eval_transform(224)
    s = " ".join(repr(t).split())
    assert "Resize(size=256" in s and "bicubic" in s and "CenterCrop(size=(224, 224))" in s
    x = t(Image.new("RGB", (500, 300)))
    assert x.shape == (3, 224, 224)


# ------------------------------------------------------------------ bad input
def _places_copy(data_root: Path, tmp: Path, train_lines=None, val_lines=None, drop=()) -> Path:
    src, dst = data_root / "places365", tmp / "places"
    dst.mkdir()
    for d in ("data_256", "val_256"):
        os.symlink(src / d, dst / d)
    for name in ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt"):
        if name in drop:
            continue
        text = (src / name).read_text()
        if name == "places365_train_standard.txt" and train_lines:
            lines = text.splitlines()
            for k, v in train_lines.items():
                lines[k] = v
            text = "\n".join(lines) + "\n"
        if name == "places365_val.txt" and val_lines:
            lines = text.splitlines()
            for k, v in val_lines.items():
                lines[k] = v
            text = "\n".join(lines) + "\n"
        (dst / name).write_text(text)
    return dst


def test_places_missing_file(data_root, tmp_path):
    r = _places_copy(data_root, tmp_path, drop=("places365_val.txt",))
    with pytest.raises(UserError, match=r"places365_val\.txt: Places365 list file not found"):
        load_places365(r, "val")
    r2 = tmp_path / "p2"
    r2.mkdir()
    with pytest.raises(UserError, match=r"categories_places365\.txt: .* not found"):
        load_places365(r2, "train")


def test_places_image_listed_but_absent(data_root, tmp_path):
    r = _places_copy(data_root, tmp_path, val_lines={4: "Places365_val_99999999.jpg 3"})
    with pytest.raises(UserError) as e:
        load_places365(r, "val")
    msg = str(e.value)
    assert "places365_val.txt: line 5:" in msg and "Places365_val_99999999.jpg does not exist" in msg
    assert "\n" not in msg


def test_places_label_outside_categories(data_root, tmp_path):
    r = _places_copy(data_root, tmp_path, train_lines={2: "/a/amphitheater/00000001.jpg 400"})
    with pytest.raises(UserError, match=r"places365_train_standard\.txt: line 3: label 400 is outside the 365"):
        load_places365(r, "train")


def test_places_label_disagrees_with_folder(data_root, tmp_path):
    r = _places_copy(data_root, tmp_path, train_lines={0: "/a/airport_terminal/00000001.jpg 5"})
    with pytest.raises(UserError, match=r"line 1: image /a/airport_terminal/00000001.jpg is not in the folder of its label 5"):
        load_places365(r, "train")


def test_inat_bad_category_and_missing_image(data_root, tmp_path):
    def bad_cat(d):
        d["annotations"][7]["category_id"] = 99

    r = _inat_copy(data_root, tmp_path, bad_cat)
    with pytest.raises(UserError, match=r"train2019\.json: annotations\[7\]: category_id 99 is not in 'categories'"):
        load_inat2019(r, "train")

    def missing(d):
        d["images"][3]["file_name"] = "train_val2019/Insects/0/nope.jpg"

    (tmp_path / "b").mkdir()
    r = _inat_copy(data_root, tmp_path / "b", missing)
    with pytest.raises(UserError, match=r"val2019\.json: images\[3\]: image file .*nope\.jpg does not exist"):
        load_inat2019(r, "val")
    with pytest.raises(UserError, match=r"val2019\.json: not found|annotation file not found"):
        load_inat2019(tmp_path, "val")


def test_class_count_disagrees_with_head(data_root):
    with pytest.raises(UserError, match=r"train2019\.json 'categories': defines 2 classes but the config's head has num_classes=1010"):
        load_split("inat2019", data_root / "inat2019", "train", num_classes=1010)
    with pytest.raises(UserError, match=r"categories_places365\.txt: defines 365 classes .* num_classes=100"):
        load_split("places365", data_root / "places365", "val", num_classes=100)


def test_cli_bad_input_one_line_no_metrics(data_root, tmp_path, capsys, tiny_crossmae_ckpt):
    from transfer import places
    _places_copy(data_root, tmp_path, val_lines={0: "Places365_val_00000001.jpg 999"})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        places.main(["--backbone", str(tiny_crossmae_ckpt), "--config", "smoke", "--data-root", str(tmp_path),
                     "--output-dir", str(out), "--cfg-options", "data.root=places"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "places365_val.txt: line 1: label 999" in err[0]
    assert not (out / "metrics.json").exists()
    with pytest.raises(SystemExit) as e:
        places.main(["--backbone", str(tmp_path / "missing.pth"), "--config", "smoke", "--output-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'missing.pth'}: --backbone checkpoint not found", err
    assert [ln for ln in err if ln.startswith("error: ")] == err[-1:]
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------ shared fixtures (imported by the other test_cls files)
