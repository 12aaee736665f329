# Smoke preset: the paper recipe shrunk to a tiny backbone at 256 px so that it trains on the real
# mini COCO (../shared/data/coco) on a CPU in minutes. Only sizes/lengths differ from paper_vit_base.
_base_ = ["./paper_vit_base.py"]
protocol = "mask_rcnn_vitdet_smoke"
resources = None                           # not the paper's 8 nodes x 8 GPUs: the suite's (CPU) resources
model = dict(arch="vit_tiny_patch16", img_size=256, embed_dim=64, depth=4, num_heads=4,
             drop_path_rate=0.1, window_size=4, global_blocks=[1, 3], out_channels=64,
             # fewer proposals / sampled RoIs: the 4-conv box head dominates CPU time at 1000 RoIs
             rpn=dict(pre_nms_topk=[400, 200], post_nms_topk=[200, 100]),
             roi_heads=dict(box_conv_dims=[64, 64, 64, 64], box_fc_dims=[256],
                            mask_conv_dims=[64, 64, 64, 64, 64], batch_size_per_image=128,
                            # keep every scored detection: a few-minute tiny detector rarely passes
                            # the recipe's 0.05, and COCOeval of no detections is NaN
                            score_thresh=0.0))
data = dict(image_size=256, test_short_edge=256, test_max_size=256, num_workers=0)
optim = dict(lr=2e-4, layer_decay=0.7, warmup_length=10 / 80, milestones=[60, 70])
train = dict(total_batch_size=2, batch_size=2, max_iter=80, amp=False,
             checkpoint_period=40, eval_period=80, log_period=10)
