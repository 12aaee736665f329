# Smoke preset: the real pipeline on the real coco_semseg copy (ADE20K layout, 80 classes, 80 train
# + 20 val pairs) with a tiny ViT, small crops, a few iterations on CPU in about a minute.
_base_ = ['./paper_vit_base.py']

protocol = 'upernet_smoke'
model = dict(num_classes=80, img_size=64, embed_dim=64, depth=4, num_heads=4, out_indices=(0, 1, 2, 3),
             drop_path_rate=0.1, channels=64, aux_channels=32)
data = dict(dataset='coco_semseg/ADEChallengeData2016', crop_size=(64, 64), scale=(256, 64), num_workers=0)
schedule = dict(max_iters=20, warmup_iters=5)
optimizer = dict(lr=1e-3)
train = dict(total_batch_size=4, log_period=5, checkpoint_period=10)
test = dict(crop_size=(64, 64), stride=(32, 32), num_overlays=2, max_images=None)
