"""Parity with mmsegmentation 1.2.2, the ADE20K oracle, on every test run.

The oracle is installed by the ``test`` extra (``pip install -e '.[test]'``, i.e. ``make test``):
``mmsegmentation==1.2.2`` and ``mmcv-lite==2.1.0`` (mmcv's Python package without compiled ops;
their declared dependencies are pure Python). Both models are built from their own config files —
mmseg's ``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` read from the installed
package, ours ``configs/ade20k/paper_vit_base.py`` — with the same sizes shrunk (ViT 64/4/4 at 64 px,
32/16-channel heads, 7 classes; the structure is the file's), the same weights are copied into both,
and we assert: equal backbone features, pyramid, decode and auxiliary logits (whole image), equal
sliding-window logits, equal multi-scale + flip predictions (``SegTTAModel``), equal losses (model and cross-entropy), identical layer-decay groups (lr scale
and weight decay of every parameter), identical mIoU / mAcc / aAcc, and on the bundled real ADE20K
images identical test-pipeline and training-pipeline outputs at every step (the training pipeline
with OUR recorded random draws replayed into mmcv/mmseg's transforms).

Import stand-ins, put in ``sys.modules`` only while this module imports mmseg (in this test process;
removed right after, never installed), each only when the real module does not import:

* ``mmcv.ops``: mmcv-lite ships the Python files of ``mmcv.ops`` but not the compiled ``mmcv._ext``
  they load. mmseg imports ``point_sample`` / ``sigmoid_focal_loss`` from it at import time for
  heads and losses (point head, MaskFormer, focal loss) that the MAE UperNet never uses.
* ``ftfy``: imported at import time by ``mmseg.utils.tokenizer`` (the CLIP tokenizer of mmseg's
  vision-language models), never used here.

Every attribute of a stand-in is a function that raises when called, so a compared module that
called one would fail a test, never pass it. Without mmseg installed the module is skipped with the
reason; under CI (``$CI`` set) that is an error instead.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch

STAND_INS = ("mmcv.ops", "ftfy")


def _raising_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name, f"import stand-in of tests/test_ade20k_parity.py for {name}")

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} called: it is an import stand-in of the mmseg parity test "
                               f"(mmcv-lite has no compiled ops)")
        missing.__name__ = attr
        return missing

    mod.__getattr__ = __getattr__
    return mod


@contextlib.contextmanager
def stand_ins():
    """Put a raising stand-in in ``sys.modules`` for each of :data:`STAND_INS` that does not import,
    and remove them again on exit. Yields the names stood in for."""
    added = []
    for name in STAND_INS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _raising_module(name)
            added.append(name)
    try:
        yield added
    finally:
        for name in added:
            sys.modules.pop(name, None)


if importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmcv") is None:
    _why = ("mmsegmentation / mmcv not installed: parity with mmseg not checked (the `test` extra installs "
            "mmsegmentation==1.2.2 and mmcv-lite==2.1.0: pip install -e '.[test]')")
    if os.environ.get("CI"):
        raise RuntimeError(_why + "; CI must run the mmseg oracle")
    pytest.skip(_why, allow_module_level=True)

with stand_ins() as STOOD_IN, warnings.catch_warnings():
    # mmcv-lite says at import that its ops-based attention is unavailable: expected, never used here
    warnings.filterwarnings("ignore", message="Fail to import ``MultiScaleDeformableAttention``")
    from mmcv.transforms import LoadImageFromFile, Resize
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.structures import PixelData
    from mmseg.engine.optimizers import LayerDecayOptimizerConstructor
    from mmseg.evaluation import IoUMetric
    from mmseg.models.losses import CrossEntropyLoss
    from mmseg.registry import MODELS, TRANSFORMS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)

from _recipe import mmseg_config_dir  # noqa: E402
from crossmae.utils import load_config  # noqa: E402
from transfer.ade20k import PRESET_DIR, build_model  # noqa: E402
from transfer.seg import data as seg_data  # noqa: E402
from transfer.seg.data import (SegTrainDataset, load_pair, pad_to, photometric_distortion, random_crop,  # noqa: E402
                               resize_pair, scan_split, to_tensor)
from transfer.seg.metrics import ConfusionMatrix  # noqa: E402
from transfer.seg.model import seg_cross_entropy  # noqa: E402
from transfer.seg.optim import param_groups_layer_decay  # noqa: E402
from transfer.seg.testing import ADE_SUBDIR, require_dir  # noqa: E402

pytestmark = pytest.mark.mmseg
MAE_CONFIG = "mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"
K = 7
CROP = 64
STRIDE = 43   # 341/512 of the paper's crop, rounded: overlapping windows, a clipped last one


def mmseg_scope():
    """mmseg's registry scope (its configs' ``default_scope``) for building from its config dicts."""
    return DefaultScope.overwrite_default_scope("mmseg")


def mmseg_cfg() -> Config:
    return Config.fromfile(str(mmseg_config_dir() / MAE_CONFIG))


def _mmseg_model():
    """mmseg's EncoderDecoder from its own MAE config file, sizes shrunk (structure unchanged)."""
    m = mmseg_cfg().model
    m.pretrained = None
    m.backbone.update(img_size=(CROP, CROP), embed_dims=64, num_layers=4, num_heads=4, out_indices=[0, 1, 2, 3])
    m.neck.embed_dim = 64
    m.decode_head.update(in_channels=[64] * 4, channels=32, num_classes=K)
    m.auxiliary_head.update(in_channels=64, channels=16, num_classes=K)
    m.data_preprocessor.size = (CROP, CROP)
    m.test_cfg.update(crop_size=(CROP, CROP), stride=(STRIDE, STRIDE))
    with mmseg_scope():
        return MODELS.build(m)


def _our_cfg():
    return load_config("paper_vit_base", [f"model.num_classes={K}", f"model.img_size={CROP}", "model.embed_dim=64",
                                          "model.depth=4", "model.num_heads=4", "model.out_indices=(0,1,2,3)",
                                          "model.channels=32", "model.aux_channels=16",
                                          f"test.crop_size=({CROP},{CROP})", f"test.stride=({STRIDE},{STRIDE})",
                                          f"data.crop_size=({CROP},{CROP})"], PRESET_DIR)


_BACKBONE_RENAMES = [
    (r"backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"backbone\.blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"backbone\.blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"backbone\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"backbone\.blocks\.(\d+)\.ls1\.gamma", r"backbone.layers.\1.gamma_1"),
    (r"backbone\.blocks\.(\d+)\.ls2\.gamma", r"backbone.layers.\1.gamma_2"),
    (r"backbone\.blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
]


def to_mmseg(name: str) -> str:
    """Our parameter name → mmseg's (neck and heads share names; the backbone is renamed)."""
    for pat, rep in _BACKBONE_RENAMES:
        new, n = re.subn(pat, rep, name)
        if n:
            return new
    return name


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = _our_cfg()
    ours = build_model(cfg)
    with torch.no_grad():  # make every parameter / BN statistic matter
        for n, p in ours.named_parameters():
            if "relative_position_bias_table" in n or n.endswith("gamma"):
                p.normal_(0, 0.5) if "relative" in n else p.uniform_(0.5, 1.5)
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    theirs = _mmseg_model()
    sd = {to_mmseg(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("relative_position_index") for k in missing), missing
    return ours.eval(), theirs.eval(), cfg


def test_stand_ins_only_during_import():
    """The stand-ins exist only while this module imports mmseg; afterwards ``sys.modules`` holds
    none of them (a later import sees the real module, or fails as it would without this test)."""
    assert set(STOOD_IN) <= set(STAND_INS)
    for name in STOOD_IN:
        assert "stand-in" not in (getattr(sys.modules.get(name), "__doc__", None) or "")


def test_same_logits_whole_and_aux(pair):
    ours, theirs, _ = pair
    x = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        f_ours = ours.backbone(x)
        f_theirs = theirs.backbone(x)
        for a, b in zip(f_ours, f_theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        pyr = theirs.neck(f_theirs)
        for a, b in zip(ours.neck(f_ours), pyr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        out, aux = ours(x)
        torch.testing.assert_close(out, theirs.decode_head(pyr), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aux, theirs.auxiliary_head(pyr), rtol=1e-4, atol=1e-4)


def test_same_logits_sliding_window(pair):
    ours, theirs, cfg = pair
    t = cfg.test
    assert (t.mode, tuple(t.crop_size), tuple(t.stride)) == (theirs.test_cfg.mode, tuple(theirs.test_cfg.crop_size),
                                                             tuple(theirs.test_cfg.stride))
    x = torch.randn(1, 3, 96, 112)  # 2 x 3 overlapping windows, the last of each row clipped to the border
    meta = [dict(img_shape=(96, 112), ori_shape=(96, 112), pad_shape=(96, 112))]
    with torch.no_grad():
        torch.testing.assert_close(ours.inference(x, t.mode, tuple(t.crop_size), tuple(t.stride)),
                                   theirs.slide_inference(x, meta), rtol=1e-4, atol=1e-4)


def test_same_multiscale_flip_prediction(pair):
    """Multi-scale + flip test (``paper_vit_base_ms``'s test): ours (``transfer.ade20k.predict``) vs
    mmseg's ``EncoderDecoder.predict`` per scale and flip (flipped back, resized to the original size)
    merged by ``SegTTAModel.merge_preds`` (mean of the softmax, argmax)."""
    from mmseg.models.segmentors import SegTTAModel
    from transfer.ade20k import predict
    ours, theirs, cfg = pair
    ms = load_config("paper_vit_base_ms", None, PRESET_DIR).test
    cfg = Config(dict(cfg.to_dict(), test=dict(cfg.test.to_dict(), aug_ratios=ms.aug_ratios, flip=ms.flip)))
    torch.manual_seed(4)
    out_size = (80, 112)
    imgs = [torch.randn(3, 64, 90), torch.randn(3, 96, 134)]  # the image at two test scales
    samples = []
    with torch.no_grad():
        mine = predict(ours, imgs, out_size, cfg)
        for img in imgs:
            for flip in (False, True):
                ds = SegDataSample()
                ds.set_metainfo(dict(img_path="x.jpg", img_shape=tuple(img.shape[1:]), pad_shape=tuple(img.shape[1:]),
                                     ori_shape=out_size, flip=flip, flip_direction="horizontal"))
                x = img.flip(-1) if flip else img
                samples += theirs.predict(x[None], [ds])
        ref = SegTTAModel(module=theirs).merge_preds([samples])[0].pred_sem_seg.data
    assert len(samples) == 2 * len(imgs)
    assert torch.equal(mine, ref.reshape(mine.shape).long())


def test_same_model_loss(pair):
    """Decode + auxiliary losses of the two segmentors (eval mode: dropout off, BN statistics fixed)."""
    ours, theirs, _ = pair
    torch.manual_seed(3)
    x = torch.randn(2, 3, CROP, CROP)
    y = torch.randint(0, K, (2, CROP, CROP))
    y[:, :10] = 255
    samples = []
    for i in range(2):
        s = SegDataSample(gt_sem_seg=PixelData(data=y[i][None]))
        s.set_metainfo(dict(img_shape=(CROP, CROP), pad_shape=(CROP, CROP)))
        samples.append(s)
    with torch.no_grad():
        mine = ours.loss(x, y)
        ref = theirs.loss(x, samples)
    torch.testing.assert_close(mine["loss_ce"], ref["decode.loss_ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine["aux.loss_ce"], ref["aux.loss_ce"], rtol=1e-5, atol=1e-6)


def test_same_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, K, 16, 16)
    label = torch.randint(0, K, (2, 64, 64))
    label[:, :10] = 255
    up = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    ref = CrossEntropyLoss(loss_weight=1.0)(up, label, ignore_index=255)
    torch.testing.assert_close(seg_cross_entropy(logits, label), ref, rtol=1e-5, atol=1e-6)


def test_same_miou_as_iou_metric():
    torch.manual_seed(2)
    k = 150
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=[f"c{i}" for i in range(k)])
    cm = ConfusionMatrix(k)
    samples = []
    for h, w in [(40, 50), (31, 64), (64, 64)]:
        label = torch.randint(0, 30, (h, w))          # most of the 150 classes absent
        label[torch.rand(h, w) < 0.1] = 255
        pred = torch.where(torch.rand(h, w) < 0.6, label.clamp(max=k - 1), torch.randint(0, 40, (h, w)))
        samples.append(dict(pred_sem_seg=dict(data=pred[None]), gt_sem_seg=dict(data=label[None])))
        cm.update(pred, label)
    metric.process({}, samples)
    ref = metric.compute_metrics(metric.results)
    ours = cm.compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        # mmseg rounds to 2 decimals (in float32)
        assert round(ours[key], 2) == pytest.approx(float(ref[key]), abs=1e-4), (key, ours[key], ref[key])


def test_same_layer_decay_groups(pair):
    """Groups from mmseg's own ``optim_wrapper`` (num_layers shrunk with the model) vs ours from the preset."""
    ours, theirs, cfg = pair
    ow = mmseg_cfg().optim_wrapper
    paramwise = dict(ow.paramwise_cfg, num_layers=cfg.model.depth)
    ctor = LayerDecayOptimizerConstructor(dict(type=ow.type, optimizer=dict(ow.optimizer)), paramwise)
    ref_groups: list = []
    ctor.add_params(ref_groups, theirs)
    ref = {n: (g["lr_scale"], g["weight_decay"]) for g in ref_groups for n in g["param_names"]}
    o = cfg.optimizer
    mine = {to_mmseg(n): (g["lr_scale"], g["weight_decay"])
            for g in param_groups_layer_decay(ours, o.lr, o.weight_decay, o.layer_decay, cfg.model.depth)
            for n in g["param_names"]}
    assert mine.keys() == ref.keys()
    for n in ref:
        assert mine[n] == pytest.approx(ref[n]), n


def _ade_samples(data_root, split):
    return scan_split(require_dir(data_root / ADE_SUBDIR), split)


def test_same_test_pipeline_on_real_images(data_root):
    """mmseg's test_pipeline (built from its config file) vs ours, on every bundled real ADE20K pair."""
    pipe = mmseg_cfg().test_pipeline
    assert [t["type"] for t in pipe] == ["LoadImageFromFile", "Resize", "LoadAnnotations", "PackSegInputs"]
    cfg = load_config("paper_vit_base", None, PRESET_DIR)
    with mmseg_scope():
        resize = TRANSFORMS.build(pipe[1])
        load_ann = TRANSFORMS.build(pipe[2])
    for split in ("training", "validation"):
        for s in _ade_samples(data_root, split):
            r = LoadImageFromFile()(dict(img_path=str(s.image)))
            full = load_ann(dict(r, seg_map_path=str(s.annotation), reduce_zero_label=cfg.data.reduce_zero_label,
                                   seg_fields=[]))
            img, label = load_pair(s, cfg.model.num_classes, cfg.data.reduce_zero_label)
            assert (full["img"] == img).all() and (full["gt_seg_map"] == label).all()
            rr = resize(dict(r))
            mine_img, _ = resize_pair(img, None, tuple(cfg.data.scale))
            assert rr["img"].shape == mine_img.shape and (rr["img"] == mine_img).all()
            for scale in [(1536, 384), (3000, 750)]:  # other scales (multi-scale test): image and label
                rr = Resize(scale=scale, keep_ratio=True)(dict(full))
                mine_img, mine_lab = resize_pair(img, label, scale)
                assert rr["img"].shape == mine_img.shape and (rr["img"] == mine_img).all()
                assert (rr["gt_seg_map"] == mine_lab).all()


# --------------------------------------------------------------------------------------------------
# training pipeline: our random draws, recorded, replayed into mmcv / mmseg's transforms
# --------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps the ``numpy.random.Generator`` our training sample draws from and records each draw as
    ``(kind, bounds, value)``: ``random`` (uniform [0, 1)), ``integers`` [low, high), ``uniform``."""

    def __init__(self, gen: np.random.Generator):
        self.gen, self.draws = gen, []

    def random(self):
        v = self.gen.random()
        self.draws.append(("random", (), v))
        return v

    def integers(self, low, high=None):
        lo, hi = (0, low) if high is None else (low, high)
        v = self.gen.integers(lo, hi)
        self.draws.append(("integers", (int(lo), int(hi)), int(v)))
        return v

    def uniform(self, low, high):
        v = self.gen.uniform(low, high)
        self.draws.append(("uniform", (float(low), float(high)), v))
        return v

    def permutation(self, n):  # the sampler's epoch order, not an augmentation draw
        return self.gen.permutation(n)


class Replay:
    """Hands out recorded draws in order, checking that each request has the recorded kind and bounds.

    Used both as OUR generator (same methods as :class:`Recorder`) and, through :meth:`patch`, as
    the ``numpy.random`` functions mmcv / mmseg's transforms call: ``random_sample`` (RandomResize
    ratio), ``randint`` (RandomCrop offsets, PhotoMetricDistortion coin flips and hue), ``uniform``
    (PhotoMetricDistortion deltas) and ``choice(options, p)`` (RandomFlip: the recorded uniform is
    mapped through the cumulative ``p`` exactly as NumPy's ``choice`` maps its own)."""

    def __init__(self, draws):
        self.draws, self.i = list(draws), 0

    def _next(self, kind, bounds):
        assert self.i < len(self.draws), f"draw {self.i} ({kind}{bounds}) requested, only {len(self.draws)} recorded"
        k, b, v = self.draws[self.i]
        assert (k, tuple(b)) == (kind, tuple(bounds)), f"draw {self.i}: recorded {k}{b}, requested {kind}{bounds}"
        self.i += 1
        return v

    # our generator's methods
    def random(self):
        return self._next("random", ())

    def integers(self, low, high=None):
        lo, hi = (0, low) if high is None else (low, high)
        return self._next("integers", (int(lo), int(hi)))

    def uniform(self, low, high):
        return self._next("uniform", (float(low), float(high)))

    # numpy.random's functions as mmcv / mmseg call them
    def np_random_sample(self, size=None):
        assert size is None
        return self.random()

    def np_randint(self, low, high=None, size=None, dtype=int):
        assert size is None
        return self.integers(low, high)

    def np_uniform(self, low=0.0, high=1.0, size=None):
        assert size is None
        return self.uniform(low, high)

    def np_choice(self, a, size=None, replace=True, p=None):
        assert size is None and p is not None
        u = self.random()
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return list(a)[int(np.searchsorted(cdf, u, side="right"))]

    @contextlib.contextmanager
    def patch(self, monkeypatch):
        with monkeypatch.context() as m:
            m.setattr(np.random, "random_sample", self.np_random_sample)
            m.setattr(np.random, "randint", self.np_randint)
            m.setattr(np.random, "uniform", self.np_uniform)
            m.setattr(np.random, "choice", self.np_choice)
            yield self


def _our_sample_recorded(ds: SegTrainDataset, position: int, monkeypatch):
    """``ds[position]`` with the generator it creates wrapped in a :class:`Recorder`."""
    rec = []
    real = np.random.default_rng

    def recording_rng(seed=None):
        r = Recorder(real(seed))
        rec.append(r)
        return r

    ds.index_of(position)  # the epoch's permutation, drawn outside the recording
    with monkeypatch.context() as m:
        m.setattr(seg_data.np.random, "default_rng", recording_rng)
        x, y = ds[position]
    assert len(rec) == 1
    return x, y, rec[0].draws


def _our_steps(s, cfg, draws):
    """Our training pipeline one step at a time with the recorded draws (the order of
    ``SegTrainDataset.__getitem__``); returns ``[(step, image, label)]``, the final tensors and what
    was drawn (``crop_tries``: crop windows drawn, ``flipped``)."""
    d, rng = cfg.data, Replay(draws)
    img, label = load_pair(s, cfg.model.num_classes, d.reduce_zero_label)
    steps = [("load", img, label)]
    lo, hi = d.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    img, label = resize_pair(img, label, (int(d.scale[0] * ratio), int(d.scale[1] * ratio)))
    steps.append(("RandomResize", img, label))
    before = rng.i
    img, label = random_crop(img, label, tuple(d.crop_size), d.cat_max_ratio, rng)
    crop_tries = (rng.i - before) // 2
    steps.append(("RandomCrop", img, label))
    flipped = rng.random() < d.flip_prob
    if flipped:
        img, label = img[:, ::-1], label[:, ::-1]
    steps.append(("RandomFlip", img, label))
    img = photometric_distortion(np.ascontiguousarray(img), rng)
    steps.append(("PhotoMetricDistortion", img, label))
    assert rng.i == len(draws)
    x = pad_to(to_tensor(img), tuple(d.crop_size), 0.0)
    y = pad_to(torch.from_numpy(np.ascontiguousarray(label)).long(), tuple(d.crop_size), 255)
    return steps, x, y, dict(crop_tries=crop_tries, flipped=flipped)


def test_same_training_pipeline_with_replayed_draws(data_root, monkeypatch):
    """For 10 sample positions on each bundled ADE20K split, the training sample of the paper preset
    (``SegTrainDataset``) is recomputed by mmseg's own ``train_pipeline`` (built from its config file:
    LoadImageFromFile, LoadAnnotations(reduce_zero_label), RandomResize, RandomCrop(cat_max_ratio),
    RandomFlip, PhotoMetricDistortion, PackSegInputs) and ``SegDataPreProcessor`` fed with the random
    draws our sample made; image and label must be equal after every step, every draw consumed."""
    ref_cfg = mmseg_cfg()
    with mmseg_scope():
        pipe = [TRANSFORMS.build(t) for t in ref_cfg.train_pipeline]
        pre = MODELS.build(ref_cfg.model.data_preprocessor)
    assert [type(t).__name__ for t in pipe] == ["LoadImageFromFile", "LoadAnnotations", "RandomResize", "RandomCrop",
                                                "RandomFlip", "PhotoMetricDistortion", "PackSegInputs"]
    cfg = load_config("paper_vit_base", None, PRESET_DIR)
    n_draws, flips, retries, n = 0, 0, 0, 0
    for split in ("training", "validation"):
        ds = SegTrainDataset(data_root / cfg.data.dataset, split, cfg.model.num_classes, seed=cfg.seed,
                             crop_size=cfg.data.crop_size, scale=cfg.data.scale, ratio_range=cfg.data.ratio_range,
                             cat_max_ratio=cfg.data.cat_max_ratio, flip_prob=cfg.data.flip_prob,
                             photometric=cfg.data.photometric, reduce_zero_label=cfg.data.reduce_zero_label)
        for position in range(10):
            x, y, draws = _our_sample_recorded(ds, position, monkeypatch)
            s = ds.samples[ds.index_of(position)]
            steps, x_steps, y_steps, info = _our_steps(s, cfg, draws)
            assert torch.equal(x_steps, x) and torch.equal(y_steps, y)  # the steps ARE the dataset's sample
            r = dict(img_path=str(s.image), seg_map_path=str(s.annotation),
                     reduce_zero_label=cfg.data.reduce_zero_label, seg_fields=[])
            with Replay(draws).patch(monkeypatch) as rep:
                for t, (name, img, label) in zip(pipe, [steps[0]] + steps):
                    r = t(r)
                    if type(t).__name__ == "LoadImageFromFile":
                        continue
                    assert type(t).__name__ == name or (name == "load" and type(t).__name__ == "LoadAnnotations")
                    assert r["img"].shape == img.shape and (r["img"] == img).all(), (split, position, name)
                    assert (r["gt_seg_map"] == label).all(), (split, position, name)
                packed = pipe[-1](r)
                assert rep.i == len(draws), "mmseg's pipeline left recorded draws unused"
            batch = pre(dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]]), training=True)
            torch.testing.assert_close(batch["inputs"][0], x, rtol=0, atol=1e-5)
            assert torch.equal(batch["data_samples"][0].gt_sem_seg.data[0].long(), y)
            n_draws += len(draws)
            flips += info["flipped"]
            retries += info["crop_tries"] > 1
            n += 1
    # the draws exercised every branch: flipped and not, crops re-drawn for cat_max_ratio and not
    assert n == 20 and 0 < flips < n and 0 < retries < n, (flips, retries)
    print(f"{n} samples, {n_draws} draws replayed, {flips} flipped, {retries} with re-drawn crops")
