# UperNet + ViT-B/16 on ADE20K: the mmsegmentation 1.2.2 recipe
# configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py (+ _base_/models/upernet_mae.py,
# _base_/datasets/ade20k.py, schedules/schedule_160k.py). Each value's source is noted.
task = 'ade20k'
protocol = 'upernet_ade20k_160k'

model = dict(
    num_classes=150,            # decode_head/auxiliary_head num_classes
    img_size=512,               # backbone img_size=(512, 512): pos_embed 14x14 -> 32x32
    patch_size=16,
    embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
    out_indices=(3, 5, 7, 11),  # backbone out_indices
    drop_path_rate=0.1,         # backbone drop_path_rate
    # mmseg's MAE backbone (BEiT) adds a relative position bias (zero init) and layer scale
    # (init_values=1.0) that MAE/CrossMAE checkpoints do not hold. True/1.0 = mmseg; False/None =
    # the plain pretrained ViT.
    rel_pos_bias=True,
    layer_scale_init=1.0,
    rescales=(4, 2, 1, 0.5),    # neck Feature2Pyramid
    channels=768,               # decode_head channels
    pool_scales=(1, 2, 3, 6),
    dropout=0.1,                # dropout_ratio of both heads
    aux_channels=256, aux_in_index=2, aux_num_convs=1,
    aux_loss_weight=0.4,
    ignore_index=255,
)

data = dict(
    dataset='ade20k/ADEChallengeData2016',   # under the data root
    train_split='training', val_split='validation',
    reduce_zero_label=True,
    crop_size=(512, 512),
    scale=(2048, 512),          # RandomResize / Resize scale
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    flip_prob=0.5,
    photometric=True,
    num_workers=4,
)

optimizer = dict(
    lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05,   # AdamW
    layer_decay=0.65,                                 # paramwise_cfg layer_decay_rate, num_layers=depth
)

schedule = dict(
    max_iters=160000,           # IterBasedTrainLoop max_iters / PolyLR end
    warmup_iters=1500,          # LinearLR end
    warmup_start_factor=1e-6,   # LinearLR start_factor
    power=1.0,                  # PolyLR power, eta_min 0
)

train = dict(
    total_batch_size=16,        # 8 GPUs x 2 images per optimizer step (mmseg "8xb2")
    batch_size=None,            # per device; None: total_batch_size / world size (2 on 8 GPUs)
    amp='bf16',                 # autocast on CUDA; ignored on CPU
    log_period=50,
    checkpoint_period=16000,    # CheckpointHook interval
    keep_checkpoints=2,
    eval_period=0,              # 0: evaluate once at the end (mmseg validates every 16000 iters)
    grad_clip=None,
)

test = dict(
    mode='slide', crop_size=(512, 512), stride=(341, 341),   # test_cfg
    aug_ratios=(),              # multi-scale test: e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) x scale
    flip=False,                 # with aug: also the flipped image; softmax averaged (SegTTAModel)
    num_overlays=4,             # coloured prediction PNGs written for the first N val images
    max_images=None,            # evaluate only the first N val images (None: all)
)

seed = 0
