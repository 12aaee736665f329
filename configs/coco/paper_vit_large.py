# detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_l_100ep.py
_base_ = ["./paper_vit_base.py"]
protocol = "mask_rcnn_vitdet_l_100ep"
model = dict(arch="vit_large_patch16", embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4,
             global_blocks=[5, 11, 17, 23])
optim = dict(layer_decay=0.8)
