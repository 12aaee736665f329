"""The classification command lines: ``python -m transfer.{finetune,linprobe,inat,places}``.

The command modules in ``transfer/`` are thin: each takes its ``(build_parser, main)`` from here. The
protocols themselves are ``transfer.classification.finetune`` (MAE fine-tuning) and
``transfer.classification.linprobe`` (MAE LARS probe, fast cached probe, per-block probe, kNN).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from crossmae.utils import UserError, cli_entry, load_config

from .common import CONFIG_ROOT, build_parser, default_preset, resolve_config
from .finetune import run_finetune
from .linprobe import PROTOCOLS, run_linprobe


def finetune_command():
    """``(build_parser, main)`` of ``python -m transfer.finetune`` (presets ``configs/finetune/``)."""

    def build() -> argparse.ArgumentParser:
        """Command line of ``python -m transfer.finetune`` (task protocol of CONTRACTS.md)."""
        return build_parser("python -m transfer.finetune", "Fine-tune a pretrained ViT (MAE protocol).")

    @cli_entry
    def main(argv: list[str] | None = None) -> dict:
        """Entry point: parse ``argv``, resolve the config (``configs/finetune/``) and run."""
        args = build().parse_args(argv)
        return run_finetune(args, resolve_config(args, CONFIG_ROOT / "finetune"), "finetune")

    return build, main


def linprobe_command():
    """``(build_parser, main)`` of ``python -m transfer.linprobe`` (presets ``configs/linprobe/``)."""

    def build() -> argparse.ArgumentParser:
        """Command line of ``python -m transfer.linprobe`` (task protocol of CONTRACTS.md + ``--protocol``)."""
        return build_parser("python -m transfer.linprobe", "Linear probing of a frozen pretrained ViT.", PROTOCOLS)

    @cli_entry
    def main(argv: list[str] | None = None) -> dict:
        """Entry point: parse ``argv``, resolve the config (``configs/linprobe/``) and run."""
        args = build().parse_args(argv)
        return run_linprobe(args, resolve_config(args, CONFIG_ROOT / "linprobe"), "linprobe")

    return build, main


# --------------------------------------------------------------------------------------------------
# dataset commands (transfer.inat, transfer.places)
# --------------------------------------------------------------------------------------------------
DATASET_PROTOCOLS = ("finetune", "linprobe")


def dataset_parser(task: str, description: str) -> argparse.ArgumentParser:
    """Parser of ``python -m transfer.<task>``: the common options + ``--protocol finetune|linprobe``."""
    p = build_parser(f"python -m transfer.{task}", description)
    p.add_argument("--protocol", choices=DATASET_PROTOCOLS, default="finetune",
                   help="finetune (default; configs/<task>/<preset>.py) or linprobe "
                        "(configs/<task>/linprobe_<preset>.py; its sub-protocol via protocol=mae|fast|blocks|knn)")
    return p


def dataset_command(task: str, description: str):
    """``(build_parser, main)`` of the command ``python -m transfer.<task>`` for a dataset preset folder
    (``transfer.inat``, ``transfer.places``); ``main`` is wrapped by ``cli_entry``."""
    def build() -> argparse.ArgumentParser:
        return dataset_parser(task, description)

    @cli_entry
    def main(argv: list[str] | None = None) -> dict:
        """Entry point (task protocol of CONTRACTS.md). Returns the metrics dict."""
        return dataset_task_main(task, argv, description)

    build.__doc__ = f"Command line of ``python -m transfer.{task}``."
    return build, main


def dataset_task_main(task: str, argv: list[str] | None, description: str) -> dict:
    """Run the fine-tuning or linear-probe protocol on a dataset preset folder ``configs/<task>/``.

    A preset name ``X`` means ``configs/<task>/X.py`` for fine-tuning and ``configs/<task>/linprobe_X.py``
    for linear probing; a path is used as given. The config's ``family`` must match ``--protocol``.

    Raises:
        UserError: the config's family disagrees with ``--protocol``.
    """
    args = dataset_parser(task, description).parse_args(argv)
    preset_dir = CONFIG_ROOT / task
    prefix = "linprobe_" if args.protocol == "linprobe" else ""
    config = default_preset(args, preset_dir, prefix)
    if prefix and not Path(config).suffix and not config.startswith(prefix):
        config = prefix + config
    cfg = load_config(config, args.cfg_options, preset_dir)
    if args.seed is not None:
        cfg.seed = args.seed
    if cfg.get("family") != args.protocol:
        raise UserError(f"{args.config}: config is for protocol {cfg.get('family')!r}, --protocol is {args.protocol!r}")
    if args.protocol == "finetune":
        return run_finetune(args, cfg, task)
    return run_linprobe(args, cfg, task)
