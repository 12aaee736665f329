# ViTDet Mask R-CNN, ViT-B, COCO 2017: detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py
# (+ configs/common/models/mask_rcnn_{fpn,vitdet}.py, common/optim.py, common/train.py, ViTDet's
# common/coco_loader_lsj.py). Every value below is the detectron2 value; docs/coco.md lists them.
protocol = "mask_rcnn_vitdet_b_100ep"

model = dict(
    arch="vit_base_patch16",
    img_size=1024, patch_size=16, pretrain_img_size=224,
    embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
    drop_path_rate=0.1,
    window_size=14,
    global_blocks=[2, 5, 8, 11],          # window_block_indexes = the other 8 blocks
    use_rel_pos=True,                     # zero init, every block
    compile=False,                        # torch.compile the ViT backbone (in place; not detectron2's)
    out_channels=256,
    scale_factors=[4.0, 2.0, 1.0, 0.5],   # + p6 by max-pool (LastLevelMaxPool)
    num_classes=80,
    pixel_mean=[123.675, 116.28, 103.53],  # RGB, 0..255
    pixel_std=[58.395, 57.12, 57.375],
    rpn=dict(
        anchor_sizes=[32, 64, 128, 256, 512],
        aspect_ratios=[0.5, 1.0, 2.0],
        conv_depth=2,
        fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_topk=[2000, 1000],        # (train, test), per level
        post_nms_topk=[1000, 1000],       # (train, test), per image
        nms_thresh=0.7,
        smooth_l1_beta=0.0,
    ),
    roi_heads=dict(
        iou_thresh=0.5,
        batch_size_per_image=512, positive_fraction=0.25,
        box_pool_size=7, mask_pool_size=14, sampling_ratio=0,   # ROIAlignV2
        box_conv_dims=[256, 256, 256, 256], box_fc_dims=[1024],
        mask_conv_dims=[256, 256, 256, 256, 256],
        bbox_reg_weights=[10.0, 10.0, 5.0, 5.0],
        smooth_l1_beta=0.0,
        score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
    ),
)

data = dict(
    dataset="coco",                        # folder under the data root
    train_ann="annotations/instances_train2017.json", train_images="train2017",
    val_ann="annotations/instances_val2017.json", val_images="val2017",
    image_size=1024,                       # LSJ target size and crop size
    scale_range=[0.1, 2.0],
    flip_prob=0.5,
    test_short_edge=1024, test_max_size=1024,
    filter_empty=True,                     # drop training images without non-crowd instances
    num_workers=4,
)

optim = dict(
    lr=1e-4, betas=[0.9, 0.999], weight_decay=0.1,
    weight_decay_norm=0.0,                 # torch.nn norm layers (the ViT LayerNorms)
    weight_decay_overrides={"pos_embed": 0.0},
    weight_decay_bias=None,                # None = weight_decay (detectron2 default)
    layer_decay=0.7,
    # detectron2: a fraction of the schedule (presets that change max_iter keep the fraction,
    # as detectron2's H file does: 250 * 138281 / 184375 = 187.5 warmup iterations there)
    warmup_length=250 / 184375, warmup_factor=0.001,
    milestones=[163889, 177546], gamma=0.1,
)

# The recipe's process layout: detectron2 trained ViTDet on 64 GPUs = 8 nodes x 8 GPUs, 1 image each.
# slurm.submit requests it (over the suite's resources; --resources / --resources coco:KEY=VALUE override
# it); a run on fewer devices (a local run, a smaller allocation) keeps total_batch_size=64 through gradient
# accumulation, and a command started by hand (torchrun, srun) ignores it.
resources = dict(nodes=8, gpus_per_node=8, tasks_per_node=8)

train = dict(
    total_batch_size=64,
    batch_size=1,                          # per device; detectron2: 64 GPUs x 1 image, accumulation fills the rest
    max_iter=184375,
    amp=True, amp_dtype="bfloat16",        # CUDA only
    ddp_fp16_compression=True,
    checkpoint_period=5000, eval_period=5000, log_period=20,
    keep_checkpoints=2,
)

test = dict(batch_size=1,
            amp=False)                     # detectron2 evaluates in fp32; True = autocast in train.amp_dtype (CUDA)
