"""Suites as data, and their expansion into tasks × backbones × seeds (no cluster needed)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from benchmarks.suites import Resources, get_suite
from crossmae.utils import REPO_ROOT, UserError
from slurm.submit import main as submit_main, plan

TRANSFER_MODULES = {"transfer.finetune", "transfer.linprobe", "transfer.inat", "transfer.places", "transfer.coco",
                    "transfer.ade20k"}


def _ckpt(path: Path, model: str, **args) -> Path:
    ns = argparse.Namespace(model=model, epochs=800, mask_ratio=0.75, decoder_depth=12, **args)
    torch.save({"model": {"w": torch.zeros(1)}, "args": ns}, path)
    return path


def test_smoke_and_paper_cover_every_transfer_module():
    for name in ("smoke", "paper"):
        s = get_suite(name)
        assert {t.module for t in s.tasks} == TRANSFER_MODULES, name
        assert len({t.name for t in s.tasks}) == len(s.tasks)
        assert s.pretrain is not None and s.pretrain.module == "crossmae.pretrain"


def test_paper_targets_a100_nodes_and_smoke_fits_two_cores():
    paper, smoke = get_suite("paper"), get_suite("smoke")
    for t in paper.tasks:
        for arch in ("vit_base_patch16", "vit_large_patch16"):
            r = t.resources_for(arch)
            assert r.gpu_type.startswith("A100") and r.gpus_per_node == 8 and r.tasks_per_node == 8
            assert r.cpus_per_task >= 1 and r.mem_gb > 0 and r.timeout_min > 0
    for t in smoke.tasks:
        r = t.resources_for("vit_tiny_patch16")
        assert r.gpus_per_node == 0 and r.cpus_per_task == 1 and r.nodes == 1


@pytest.mark.parametrize("suite", ["smoke", "paper"])
def test_every_preset_of_a_suite_exists(suite):
    s = get_suite(suite)
    archs = ["vit_tiny_patch16"] if suite == "smoke" else ["vit_base_patch16", "vit_large_patch16"]
    missing = []
    for t in s.tasks:
        if importlib.util.find_spec(t.module) is None:
            pytest.skip(f"{t.module} not written yet")
        for a in archs:
            if not (REPO_ROOT / "configs" / t.config_dir / f"{t.config_for(a)}.py").is_file():
                missing.append(f"configs/{t.config_dir}/{t.config_for(a)}.py")
    for preset in s.extra.get("pretrain_presets", {}).values():
        if not (REPO_ROOT / "configs" / "pretrain" / f"{preset}.py").is_file():
            missing.append(f"configs/pretrain/{preset}.py")
    assert not missing


def test_plan_expands_tasks_backbones_seeds(tmp_path):
    a = _ckpt(tmp_path / "a.pth", "mae_vit_base_patch16")
    b = _ckpt(tmp_path / "b.pth", "crossmae_vit_base_patch16", kept_mask_ratio=0.25)
    specs = plan(get_suite("paper"), tmp_path / "out", backbones={"mae": str(a), "cmae": str(b)}, seeds=[0, 1, 2],
                 data_root="/data")
    assert len(specs) == len(get_suite("paper").tasks) * 2 * 3
    ids = {s.id for s in specs}
    assert len(ids) == len(specs)
    s = next(s for s in specs if s.id == "cmae/coco-paper_vit_base/seed2")
    assert s.arch == "vit_base_patch16"  # read from the checkpoint's args.model
    assert s.resources["nodes"] == 8 and s.resources["gpus_per_node"] == 8  # the recipe's 64 GPUs (configs/coco)
    argv = s.argv()
    assert argv[argv.index("--backbone") + 1] == str(b.resolve())
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--data-root") + 1] == "/data"
    assert Path(argv[argv.index("--output-dir") + 1]) == (tmp_path / "out" / s.id).resolve()


def test_plan_large_arch_and_resource_override(tmp_path):
    ck = _ckpt(tmp_path / "l.pth", "mae_vit_large_patch16")
    specs = plan(get_suite("paper"), tmp_path, backbones={"l": str(ck)}, tasks=["finetune"],
                 resources={"timeout_min": "90", "nodes": "1"})
    assert [s.config for s in specs] == ["paper_vit_large"]
    assert specs[0].resources["timeout_min"] == 90 and specs[0].resources["nodes"] == 1


def test_plan_with_pretraining_depends_on_it(tmp_path):
    specs = plan(get_suite("smoke"), tmp_path, pretrains={"mae": "smoke_mae", "crossmae": "smoke_crossmae"})
    pre = [s for s in specs if s.kind == "pretrain"]
    assert [s.id for s in pre] == ["pretrain/mae", "pretrain/crossmae"]
    tr = [s for s in specs if s.kind == "transfer"]
    assert len(tr) == 2 * len(get_suite("smoke").tasks)
    assert all(s.depends_on == [f"pretrain/{s.backbone_name}"] for s in tr)
    assert all(s.backbone.startswith("pretrain:") for s in tr)


@pytest.mark.parametrize("kw,msg", [
    (dict(), "at least one backbone"),
    (dict(backbones={"x": "/nonexistent.pth"}), "checkpoint not found"),
    (dict(backbones={"x": __file__}, seeds=[1, 1]), "distinct seeds"),
    (dict(backbones={"x": __file__}, tasks=["nope"]), "not a task of suite"),
    (dict(pretrains={"m": "no_such_preset"}), "no preset configs/pretrain/no_such_preset.py"),
    (dict(backbones={"x": __file__}, resources={"gpus": "2"}), "unknown resource"),
])
def test_plan_rejects_bad_input(tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        plan(get_suite("smoke"), tmp_path, **kw)


def test_unknown_suite_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        submit_main(["--suite", "nope", "--backbone", f"a={__file__}", "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --suite nope: unknown suite") and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    ck = _ckpt(tmp_path / "b.pth", "mae_vit_base_patch16")
    res = submit_main(["--suite", "paper", "--backbone", f"mae={ck}", "--output-dir", str(tmp_path / "o"),
                       "--data-root", str(tmp_path), "--dry-run", "--tasks", "coco", "ade20k"])
    out = capsys.readouterr().out
    assert "mae/coco-paper_vit_base/seed0" in out and "nodes=8 gpus/node=8" in out
    assert len(res["specs"]) == 2 and not (tmp_path / "o").exists()


def test_resources_replace_types():
    r = Resources().replace(mem_gb="2.5", nodes="3")
    assert r.mem_gb == 2.5 and r.nodes == 3
    with pytest.raises(UserError, match="expected int"):
        Resources().replace(nodes="two")


def test_main_job_refuses_a_missing_data_root(tmp_path, capsys):
    from slurm.main_job import main as main_job
    with pytest.raises(SystemExit) as e:
        main_job(["--data-root", str(tmp_path / "nodata"), "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nodata'}: data root does not exist " \
                                              "(set --data-root or $CROSSMAE_DATA_ROOT)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,msg", [
    (["--array-parallelism", "0"], "--array-parallelism 0: must be an integer >= 1"),
    (["--array-parallelism", "-3"], "--array-parallelism -3: must be an integer >= 1"),
    (["--max-num-timeout", "-1"], "--max-num-timeout -1: must be an integer >= 0"),
    (["--seeds", "0", "-2"], "--seeds -2: must be an integer in [0, 4294967295]"),
    (["--seeds", str(2**32)], f"--seeds {2**32}: must be an integer in [0, 4294967295]"),
    (["--resources", "cpus_per_task=0"], "--resources cpus_per_task=0: must be >= 1"),
    (["--resources", "nodes=-1"], "--resources nodes=-1: must be >= 1"),
    (["--resources", "timeout_min=0"], "--resources timeout_min=0: must be >= 1"),
    (["--resources", "gpus_per_node=-1"], "--resources gpus_per_node=-1: must be >= 0"),
    (["--resources", "mem_gb=-2"], "--resources mem_gb=-2: must be a positive number"),
    (["--resources", "mem_gb=nan"], "--resources mem_gb=nan: must be a positive number"),
    (["--pretrain", "mae", "--pretrain-resources", "tasks_per_node=0"],
     "--pretrain-resources tasks_per_node=0: must be >= 1"),
])
def test_submit_refuses_nonsense_numbers_and_writes_nothing(tmp_path, capsys, extra, msg):
    """Without the checks, 0 parallelism silently became the default and ran the task."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        submit_main(["--suite", "selftest", "--backbone", f"a={__file__}", "--output-dir", str(out),
                     "--executor", "local", "--no-leaderboard", *extra])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"
    assert not out.exists()


@pytest.mark.parametrize("extra,msg", [
    (["--array-parallelism", "0"], "--array-parallelism 0: must be an integer >= 1"),
    (["--array-parallelism", "-1"], "--array-parallelism -1: must be an integer >= 1"),
    (["--seeds", "-1"], "--seeds -1: must be an integer in [0, 4294967295]"),
])
def test_main_job_refuses_nonsense_numbers_and_writes_nothing(tmp_path, capsys, data_root, extra, msg):
    from slurm.main_job import main as main_job
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main_job(["--data-root", str(data_root), "--output-dir", str(out), "--tasks", "places", *extra])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"
    assert not out.exists()


def test_resources_precedence_suite_recipe_command_line_task(tmp_path):
    """suite entry < the recipe's own layout (config ``resources``) < --resources k=v < --resources TASK:k=v;
    the COCO paper preset records its 64-GPU layout (8 nodes x 8 GPUs, inherited by ViT-L / ViT-H)."""
    from benchmarks.suites import Resources, TaskDef
    from slurm.submit import recipe_resources, split_task_resources, task_resources
    coco = get_suite("paper").task("coco")
    for cfg in ("paper_vit_base", "paper_vit_large", "paper_vit_huge"):
        assert recipe_resources(coco, cfg) == {"nodes": 8, "gpus_per_node": 8, "tasks_per_node": 8}
    assert recipe_resources(get_suite("paper").task("ade20k"), "paper_vit_base") == {}
    rec = tmp_path / "recipe.py"
    rec.write_text("resources = dict(nodes=3, tasks_per_node=2)\nlr = 1.0\n")
    td = TaskDef(name="t", module="transfer.coco", protocol="p", configs={"*": str(rec)},
                 resources={"*": Resources(nodes=1, tasks_per_node=1, cpus_per_task=5)})
    assert task_resources(td, "a", str(rec), {}, None) == Resources(nodes=3, tasks_per_node=2, cpus_per_task=5)
    assert task_resources(td, "a", str(rec), {"nodes": "2"}, None).nodes == 2
    assert task_resources(td, "a", str(rec), {"nodes": "2"}, {"nodes": "4"}).nodes == 4
    common, per = split_task_resources({"nodes": "2", "coco:nodes": "1", "coco:mem_gb": "8"}, get_suite("paper"))
    assert common == {"nodes": "2"} and per == {"coco": {"nodes": "1", "mem_gb": "8"}}
    with pytest.raises(UserError, match="--resources t:nodes=0: must be >= 1"):
        task_resources(td, "a", str(rec), {}, {"nodes": "0"})
    with pytest.raises(UserError, match="suite 'paper' has no task 'nope'"):
        split_task_resources({"nope:nodes": "1"}, get_suite("paper"))
    rec.write_text("resources = dict(nodes=2, partition='x')\n")
    with pytest.raises(UserError, match="resources must be a dict of nodes, gpus_per_node, tasks_per_node"):
        recipe_resources(td, str(rec))  # the same path rewritten: read again


def test_local_runs_fold_a_multi_node_layout_onto_this_machine():
    from benchmarks.suites import Resources
    from slurm.executor import local_resources
    paper = Resources(nodes=8, gpus_per_node=8, tasks_per_node=8)
    assert local_resources(paper, cpus=2, gpus=0) == Resources(nodes=1, gpus_per_node=0, tasks_per_node=1)
    assert local_resources(paper, cpus=16, gpus=2) == Resources(nodes=1, gpus_per_node=2, tasks_per_node=2)
    cpu = Resources(nodes=2, tasks_per_node=1)  # 2 nodes x 1 CPU process: the same world size on one host
    assert local_resources(cpu, cpus=2, gpus=0) == Resources(nodes=1, tasks_per_node=2)
    assert local_resources(Resources(nodes=4, tasks_per_node=2), cpus=2, gpus=0).tasks_per_node == 2


def test_the_coco_smoke_preset_does_not_inherit_the_paper_layout():
    from slurm.submit import recipe_resources
    assert recipe_resources(get_suite("smoke").task("coco"), "smoke") == {}
    spec = plan(get_suite("smoke"), Path("/tmp/x"), backbones={"a": __file__}, tasks=["coco"])[0]
    assert (spec.resources["nodes"], spec.resources["gpus_per_node"]) == (1, 0)
