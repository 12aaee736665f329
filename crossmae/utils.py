"""Shared infrastructure for every command of the suite.

Everything here is protocol-neutral plumbing that each pretraining / transfer command needs in the
same form: one-line user errors, atomic writes, checkpoint hashing, the data root, mmengine configs,
seeding, safe ``torch.load`` and DDP initialisation. Protocol code lives in the task modules.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Environment variable that locates the datasets (COCO, ADE20K, iNat, Places365, ImageNet).
DATA_ROOT_ENV = "CROSSMAE_DATA_ROOT"


class UserError(Exception):
    """An error caused by the user's input (a file, a flag, a config value).

    Its message is a single line that names the offending file or option and the problem; command-line
    entry points print it as ``error: <message>`` and exit with status 2 (see :func:`cli_entry`).
    """


def cli_entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's ``main(argv)`` so a :class:`UserError` ends the process cleanly.

    The wrapped function prints ``error: <one line>`` on stderr and calls ``sys.exit(2)``; any other
    exception propagates with its traceback (that is a bug, not bad input).
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            msg = " ".join(str(exc).split("\n"))
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> Path:
    """Every atomic write of the suite: :func:`crossmae.safeio.atomic_write` (temporary file created
    ``O_EXCL | O_NOFOLLOW`` in the real folder, then renamed; a symlink is refused, never followed)."""
    from .safeio import atomic_write
    return atomic_write(path, write, binary)


def check_writable(path: str | os.PathLike, what: str, *, folder: bool) -> Path:
    """Refuse an output path that cannot be written, before any work and WITHOUT creating anything.

    ``folder=True``: ``path`` is a folder to hold outputs (``--output-dir``); ``folder=False``: a file
    to write. The path itself (for a folder) or its nearest existing ancestor must be a directory
    this process can create files in; that is probed with a temporary file removed at once
    (``os.access`` is not enough for root or on network file systems).

    Args:
        what: how the one-line error names the path (``"--output-dir"``, ``"--out"``, ``"export target"``).

    Raises:
        UserError: the path is a file where a folder is wanted (or a folder where a file is), lies
            under a file, or is not writable.
    """
    path = Path(path).expanduser()
    if os.path.islink(path):  # a planted link (or a loop) would redirect every write of the run
        raise UserError(f"{path}: {what} is a symlink; refused (give the real folder or file)")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # the checks below name the file it lies under
    except OSError as exc:  # ENAMETOOLONG, ELOOP in a parent, EACCES
        from .safeio import oserror_line
        raise oserror_line(path, exc, what) from None
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{path}: {what} exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{path}: {what} is a folder")
    anchor = path if folder else path.parent
    while not anchor.exists() and anchor.parent != anchor:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"{path}: {what} lies under {anchor}, which is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{path}: {what} is not writable ({anchor}: {exc.strerror or exc})") from None
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written checkpoint: either the old file or the complete new one.
    """
    return _atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats (NaN, ±inf) by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented strict JSON atomically (temp file + rename); NaN / inf become
    ``null`` (e.g. COCO AP with no detections). Returns the path."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` atomically (temp file + rename). Returns the path."""
    return _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write raw bytes (e.g. an encoded PNG) atomically (temp file + rename). Returns the path."""
    return _atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_write_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Render a matplotlib figure to PNG in memory and write it with :func:`atomic_write_bytes`
    (never through a planted symlink or a guessable temporary name), then close the figure.
    ``savefig_kwargs`` go to ``Figure.savefig`` (``dpi``, ``bbox_inches``, …). Returns the path."""
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (used to key caches and to identify checkpoints in results).

    Raises:
        UserError: not a regular file (a FIFO or device is refused, never waited on).
        OSError: the file cannot be opened."""
    import stat
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # never waits on a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path}: not a regular file; refused")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# data root, configs, seeding
# --------------------------------------------------------------------------------------------------
def resolve_data_root(arg: str | os.PathLike | None = None) -> Path:
    """The datasets' root folder: ``arg`` if given, else ``$CROSSMAE_DATA_ROOT``, else ``../shared/data``
    next to the repository (the bundled real subsets).

    Raises:
        UserError: the folder does not exist.
    """
    if arg:
        root = Path(arg)
    elif os.environ.get(DATA_ROOT_ENV):
        root = Path(os.environ[DATA_ROOT_ENV])
    else:
        root = REPO_ROOT.parent / "shared" / "data"
    root = root.expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: data root does not exist (set --data-root or ${DATA_ROOT_ENV})")
    return root


def parse_cfg_options(options: Iterable[str] | None) -> dict:
    """Turn ``["a.b=1", "c=[1,2]", "d=foo"]`` into ``{"a.b": 1, "c": [1, 2], "d": "foo"}``.

    Values are parsed as Python literals when possible (numbers, lists, tuples, booleans, None),
    otherwise kept as strings — the behaviour of mmengine's ``DictAction``.

    Raises:
        UserError: an option is not of the form ``key=value``.
    """
    import ast

    out: dict = {}
    for opt in options or []:
        if "=" not in opt:
            raise UserError(f"--cfg-options {opt!r}: expected key=value")
        key, value = opt.split("=", 1)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            lowered = value.lower()
            parsed = {"true": True, "false": False, "none": None}.get(lowered, value)
        out[key.strip()] = parsed
    return out


def load_config(config: str | os.PathLike, cfg_options: Iterable[str] | None = None,
                preset_dir: str | os.PathLike | None = None):
    """Load an mmengine Python config and apply ``--cfg-options`` overrides.

    Args:
        config: a path to a ``.py`` config, or a preset name looked up as ``<preset_dir>/<name>.py``.
        cfg_options: ``key=value`` strings (dotted keys), applied with ``Config.merge_from_dict``.
        preset_dir: the folder of the command's presets (e.g. ``configs/pretrain``).

    Returns:
        ``mmengine.Config``.

    Every override is checked against the preset's value (type) and the field's range rule
    (:func:`check_override`), and the resolved config's fields against :data:`CONFIG_RULES`
    (:func:`check_config_values`), so a bad value fails here, before any command does work.

    Raises:
        UserError: the file does not exist, cannot be parsed, an override names an unknown key or has
            the wrong type, or a value is out of range (one line naming the file, key and value).
    """
    from mmengine.config import Config

    path = Path(config)
    if not path.suffix and preset_dir is not None:
        path = Path(preset_dir) / f"{config}.py"
    if not path.is_file():
        known = ""
        if preset_dir is not None and Path(preset_dir).is_dir():
            known = " (presets: " + ", ".join(sorted(p.stem for p in Path(preset_dir).glob("*.py")
                                                     if not p.stem.startswith("_"))) + ")"
        raise UserError(f"{path}: config not found{known}")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # mmengine raises several types for syntax / import errors
        raise UserError(f"{path}: cannot parse config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if preset_dir is not None:
        missing = [k for k in required_config_keys(preset_dir) if k not in cfg]
        if missing:
            raise UserError(f"{path}: config lacks {', '.join(missing[:6])}"
                            f"{f' (+{len(missing) - 6} more)' if len(missing) > 6 else ''}, which every preset of "
                            f"{Path(preset_dir).name} defines (empty, or a config of another command?)")
    overrides = parse_cfg_options(cfg_options)
    as_dict = cfg.to_dict()
    check_run_vocabulary(path, as_dict)
    for key, value in overrides.items():
        check_run_vocabulary(path, {key: value}, "--cfg-options ")
        node = as_dict
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"{path}: --cfg-options names unknown key {key!r}")
            node = node[part]
        check_override(path, key, value, node)
    if overrides:
        cfg.merge_from_dict(overrides)
    check_config_values(path, cfg.to_dict())
    return cfg


@functools.lru_cache(maxsize=None)
def _preset_keys(preset_dir: str) -> tuple[str, ...]:
    from mmengine.config import Config
    common: set[str] | None = None
    for p in sorted(Path(preset_dir).glob("*.py")):
        if p.stem.startswith("_"):
            continue
        try:
            keys = set(Config.fromfile(str(p)).keys())
        except Exception:  # a broken preset is reported when it is the one loaded
            continue
        common = keys if common is None else common & keys
    return tuple(sorted(common or ()))


def required_config_keys(preset_dir: str | os.PathLike) -> tuple[str, ...]:
    """The top-level keys every preset of a command defines (``configs/<command>/*.py`` except
    ``_*.py``): what a ``--config`` file of that command must define too (checked by
    :func:`load_config`, so an empty config or one of another command is one line, not an
    ``AttributeError`` deep in the command). Cached per folder."""
    return _preset_keys(str(Path(preset_dir).resolve()))


# --------------------------------------------------------------------------------------------------
# the run vocabulary (docs/CONTRACTS.md "Run vocabulary"): one name per run concept in every command
# --------------------------------------------------------------------------------------------------
#: Old names of the run concepts the driver reads → their one name in every command's config.
#: Periods count the task's own step (epochs for epoch-based tasks, iterations for iteration-based).
RENAMED_KEYS: dict[str, str] = {
    "log_freq": "log_period", "log_interval": "log_period",
    "save_freq": "checkpoint_period", "checkpoint_interval": "checkpoint_period",
    "snapshot_freq": "snapshot_period", "save_interval": "snapshot_period",
    "eval_interval": "eval_period", "val_interval": "eval_period",
    "batch_size_per_device": "batch_size",
}


def check_run_vocabulary(path: str | os.PathLike, cfg_dict: dict, what: str = "config ", prefix: str = "") -> None:
    """Refuse a config (or ``--cfg-options``) key that uses an old name of a run concept
    (:data:`RENAMED_KEYS`), at any depth.

    Raises:
        UserError: ``<file>: config train.log_interval was renamed: use train.log_period``.
    """
    for k, v in cfg_dict.items():
        key = f"{prefix}{k}"
        last = key.rsplit(".", 1)[-1]
        if last in RENAMED_KEYS:
            new = key[: len(key) - len(last)] + RENAMED_KEYS[last]
            raise UserError(f"{path}: {what}{key} was renamed: use {new} (docs/CONTRACTS.md, run vocabulary)")
        if isinstance(v, dict):
            check_run_vocabulary(path, v, what, key + ".")


# --------------------------------------------------------------------------------------------------
# config value checks (types follow the preset; ranges by field name)
# --------------------------------------------------------------------------------------------------
class _Rule:
    """The accepted values of a config field: a kind (``int`` or ``float``), bounds and whether None
    is accepted. ``elementwise`` rules apply to every element of a list/tuple value."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 nullable: bool = False, elementwise: bool = False):
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
        self.nullable, self.elementwise = nullable, elementwise

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            what += (f" > {self.lo:g}" if self.lo_open else f" >= {self.lo:g}")
        if self.elementwise:
            what = f"a list of {what.replace('an integer', 'integers').replace('a number', 'numbers')}"
        return what + (" (or None)" if self.nullable else "")

    def _ok_scalar(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if isinstance(v, float) and not np.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if self.elementwise:
            return isinstance(v, (list, tuple)) and all(self._ok_scalar(x) for x in v)
        return self._ok_scalar(v)


def _rules(names: str, rule: _Rule) -> dict[str, _Rule]:
    return {n: rule for n in names.split()}


#: Range rules by field name (the last part of a dotted key), built from every configs/*/ preset:
#: counts and sizes are positive integers, workers / warm-up lengths / periods that may be 0 are
#: non-negative integers, learning rates are non-negative, decays and loss weights non-negative, ratios,
#: probabilities and thresholds lie in [0, 1]. A field whose preset value is None accepts None.
CONFIG_RULES: dict[str, _Rule] = {
    **_rules("batch_size total_batch_size batch_size_per_image extract_batch_size "
             "epochs max_iter max_iters accum_iter input_size img_size image_size pretrain_img_size patch_size "
             "embed_dim depth decoder_depth num_heads num_classes channels aux_channels out_channels "
             "window_size test_short_edge test_max_size detections_per_img box_pool_size mask_pool_size k "
             "data_subset max_images log_period checkpoint_period", _Rule(int, 1)),
    **_rules("num_workers warmup_epochs warmup_iters snapshot_period eval_period keep_checkpoints num_overlays "
             "aux_num_convs conv_depth sampling_ratio recount aux_in_index", _Rule(int, 0)),
    **_rules("blr lr", _Rule(float, 0)),   # 0 is a frozen run (tests use it), negative is an error
    **_rules("temperature mlp_ratio head_init_std gamma power", _Rule(float, 0, lo_open=True)),
    **_rules("warmup_factor warmup_start_factor layer_decay", _Rule(float, 0, 1, lo_open=True)),
    **_rules("min_lr weight_decay mixup cutmix smooth_l1_beta aux_loss_weight", _Rule(float, 0)),
    **_rules("weight_decay_norm weight_decay_bias clip_grad grad_clip", _Rule(float, 0, nullable=True)),
    **_rules("kept_mask_ratio", _Rule(float, 0, 1, nullable=True)),
    **_rules("mask_ratio drop_path drop_path_rate dropout flip_prob reprob mixup_prob "
             "mixup_switch_prob smoothing holdout_fraction positive_fraction fg_iou_thresh bg_iou_thresh "
             "iou_thresh nms_thresh score_thresh cat_max_ratio warmup_length", _Rule(float, 0, 1)),
    **_rules("blrs", _Rule(float, 0, lo_open=True, elementwise=True)),
    **_rules("betas", _Rule(float, 0, 1, elementwise=True)),
    **_rules("crop_size stride scale anchor_sizes box_conv_dims box_fc_dims mask_conv_dims pre_nms_topk "
             "post_nms_topk", _Rule(int, 1, elementwise=True)),
}


def _type_name(v: Any) -> str:
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "a boolean (True/False)"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a dict"
    return type(v).__name__


def _same_type(value: Any, preset: Any) -> bool:
    """Whether an override ``value`` has the type of the preset's value: int stays int, a float field
    accepts an int, bool only bool, a string / float field accepts None (``aug.auto_augment=None``,
    ``model.layer_scale_init=None``), lists and tuples are interchangeable, a None preset accepts
    anything."""
    if preset is None:
        return True
    if isinstance(preset, bool):
        return isinstance(value, bool)
    if isinstance(preset, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(preset, float):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if isinstance(preset, str):
        return value is None or isinstance(value, str)
    if isinstance(preset, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(preset, dict):
        return isinstance(value, dict)
    return True


def check_override(path: str | os.PathLike, key: str, value: Any, preset: Any) -> None:
    """Check one ``--cfg-options key=value`` against the preset's value (type) and the field's rule
    (range, :data:`CONFIG_RULES`), before anything runs.

    Raises:
        UserError: one line naming the config file, the key, the value and what is expected.
    """
    if key.rsplit(".", 1)[-1] == "compile":  # bool or a backend name (torch.compile options)
        check_compile_option(value, f"{path}: --cfg-options {key}")
        return
    rule = CONFIG_RULES.get(key.rsplit(".", 1)[-1])
    numeric = rule is not None and (preset is None or isinstance(preset, (int, float, list, tuple))) \
        and not isinstance(preset, bool)
    if not _same_type(value, preset):
        expected = rule.describe() if numeric else _type_name(preset)
        raise UserError(f"{path}: --cfg-options {key}={value!r}: expected {expected} (preset value {preset!r}), "
                        f"got {_type_name(value)}")
    if not numeric:
        return
    if value is None:
        if preset is None or rule.nullable:
            return
    elif rule.ok(value):
        return
    expected = rule.describe() + (" (or None)" if preset is None and not rule.nullable else "")
    raise UserError(f"{path}: --cfg-options {key}={value!r}: expected {expected} (preset value {preset!r})")


def check_config_values(path: str | os.PathLike, cfg_dict: dict, prefix: str = "") -> None:
    """Check every field of a resolved config (a preset, a ``--config FILE``, after overrides) that has
    a range rule (:data:`CONFIG_RULES`); None is left to the command (it means "derive it").

    Raises:
        UserError: one line naming the config file, the key, the value and what is expected.
    """
    for k, v in cfg_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            check_config_values(path, v, key + ".")
            continue
        if k == "compile":
            check_compile_option(v, f"{path}: config {key}")
            continue
        rule = CONFIG_RULES.get(str(k))
        if rule is not None and v is not None and not rule.ok(v):
            raise UserError(f"{path}: config {key}={v!r}: expected {rule.describe()}")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": value}`` (dotted keys, the form of ``--cfg-options``)."""
    res = {}
    for k, v in d.items():
        if isinstance(v, dict):
            res.update(flatten(v, f"{prefix}{k}."))
        else:
            res[f"{prefix}{k}"] = v
    return res


def config_hash(cfg_dict: dict) -> str:
    """Short SHA-256 (16 hex chars) of a config's canonical JSON, for the leaderboard."""
    blob = json.dumps(cfg_dict, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); with ``deterministic`` also ask torch for
    deterministic kernels (``warn_only`` so ops without one still run)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy / random seeds from torch's per-worker seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
#: Classes a known checkpoint format may hold besides tensors and containers: the official MAE /
#: CrossMAE training scripts store their ``argparse.Namespace`` under ``args``.
SAFE_GLOBALS = [argparse.Namespace]


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    root: str | os.PathLike | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``, allow-listing only :data:`SAFE_GLOBALS`
    (:func:`safe_torch_load_hashed` without the digest)."""
    return safe_torch_load_hashed(path, map_location, root=root)[0]


def safe_torch_load_hashed(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                           root: str | os.PathLike | None = None,
                           verify: Callable[[Path, str], None] | None = None) -> tuple[Any, str]:
    """``(object, sha256)``: ``torch.load`` (``weights_only=True``, only :data:`SAFE_GLOBALS`) of the
    bytes of ``path`` read once, the SHA-256 computed from exactly those bytes while they are read
    (no second pass that a swapped file could answer differently).

    The file is read as a regular file (:func:`crossmae.safeio.read_regular`: never a FIFO or a
    device). ``path`` given by the user may be a symlink (it is resolved first); with ``root`` (a file
    of a run folder, e.g. ``checkpoint-latest.pth``) a symlink or a file outside ``root`` is refused.
    ``verify(path, sha256)`` (e.g. :func:`crossmae.zoo.check_loaded_sha256`) runs before anything is
    unpickled. Memory: the file's bytes are held while torch builds the tensors (peak about twice
    the file).

    Raises:
        UserError: missing file, not a regular file, empty/truncated file, or a pickle that needs other
            globals (a pickle that would run code is refused, never executed).
    """
    import io
    from .safeio import read_hashed
    path = Path(path)
    if root is None and os.path.islink(path):
        path = path.resolve()
    if path.is_dir():
        raise UserError(f"{path}: checkpoint file not found (a folder)")
    try:
        if root is not None:
            from .safeio import check_inside
            check_inside(path, root)
        data, sha = read_hashed(path)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file not found") from None
    if not data:
        raise UserError(f"{path}: checkpoint file is empty")
    if verify is not None:
        verify(path, sha)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), sha
    except pickle_errors() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            glob = _unsupported_global(str(exc))
            raise UserError(f"{path}: refused to unpickle {glob or 'an object'} "
                            f"(weights_only=True; only tensors and argparse.Namespace are allowed)")
        raise UserError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first}")


def pickle_errors() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile
    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, TypeError, KeyError, IndexError)


def _unsupported_global(msg: str) -> str | None:
    import re
    m = re.search(r"Unsupported global: GLOBAL ([\w\.]+)", msg)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------------
def init_distributed(backend: str | None = None, force: bool = False) -> tuple[int, int, int]:
    """Initialise ``torch.distributed`` for this process: a thin wrapper over
    :func:`crossmae.distributed.setup` (the one derivation of the layout from Slurm / torchrun
    variables, CUDA device = local rank, process group with a timeout).

    With one process nothing is initialised — unless ``force`` (a one-process group, e.g. to check
    NCCL on a single GPU; then ``MASTER_ADDR`` / ``MASTER_PORT`` must be set).

    Returns:
        ``(rank, world_size, local_rank)``.

    Raises:
        UserError: see :func:`crossmae.distributed.setup` (unreachable master, bad variables).
    """
    import torch.distributed as dist

    from .distributed import setup
    layout = setup(backend)
    if layout.world_size == 1 and force and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", world_size=1, rank=0)
    return layout.rank, layout.world_size, layout.local_rank


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def default_device() -> torch.device:
    """``cuda:<local rank>`` when CUDA is available, else CPU (the layout's device:
    :attr:`crossmae.distributed.Layout.device`)."""
    from .distributed import layout_from_env
    return layout_from_env().device


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def compile_backends() -> list[str]:
    """Names ``torch.compile`` accepts as ``backend`` here (``inductor``, ``aot_eager``, ``eager``, …)."""
    import torch._dynamo
    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_compile_option(value: Any, option: str = "config compile") -> None:
    """Validate a ``compile`` config value: ``False``, ``True`` (the default ``inductor`` backend) or
    a backend name from :func:`compile_backends` (``'aot_eager'`` traces and differentiates without
    generating code: the cheap check on CPU).

    Raises:
        UserError: any other value, naming ``option``.
    """
    if isinstance(value, bool):
        return
    if isinstance(value, str) and value in compile_backends():
        return
    raise UserError(f"{option}: expected True, False or a torch.compile backend name "
                    f"(e.g. inductor, aot_eager, eager), got {value!r}")


def maybe_compile(module: torch.nn.Module, enabled: Any, option: str = "config compile",
                  **options) -> torch.nn.Module:
    """Compile ``module`` in place with ``torch.compile`` when ``enabled`` asks for it; return it.

    Uses ``nn.Module.compile`` (the module's own call is compiled), so parameter names and
    ``state_dict()`` keys stay exactly as in eager mode: no ``_orig_mod.`` prefix ever reaches a
    checkpoint, and DDP / optimizers / loaders see the same object. Compilation itself happens
    lazily at the first call (and again for each new input shape).

    Args:
        module: the model or sub-module (e.g. the ViTDet ViT) to compile.
        enabled: the config's ``compile`` value: ``False`` (eager), ``True`` (backend ``inductor``)
            or a backend name (see :func:`check_compile_option`).
        option: the option's name for the error message.
        options: passed on to ``torch.compile`` (e.g. ``mode="max-autotune"``).

    Raises:
        UserError: an invalid ``enabled`` value (checked before anything is compiled).
    """
    check_compile_option(enabled, option)
    if enabled is False:
        return module
    if isinstance(enabled, str):
        options.setdefault("backend", enabled)
    module.compile(**options)
    return module
