# detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_h_75ep.py: patch 16 (the p14->p16 converted
# MAE ViT-H checkpoint), 75 epochs, and NO weight-decay exemptions (overrides = {}, weight_decay_norm
# = None), exactly as the detectron2 config says. `_delete_=True` empties B's overrides (a plain {}
# would be merged into them and keep pos_embed's 0). Tied to the file by tests/test_coco_recipe.py.
_base_ = ["./paper_vit_base.py"]
protocol = "mask_rcnn_vitdet_h_75ep"
model = dict(arch="vit_huge_patch14", patch_size=16, embed_dim=1280, depth=32, num_heads=16,
             drop_path_rate=0.5, global_blocks=[7, 15, 23, 31])
optim = dict(layer_decay=0.9, weight_decay_norm=None, weight_decay_overrides=dict(_delete_=True),
             milestones=[163889 * 3 // 4, 177546 * 3 // 4])
train = dict(max_iter=184375 * 3 // 4)
