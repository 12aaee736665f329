# ViT-B/16 ImageNet-1k linear probe, MAE recipe: 90 ep, batch 16384, LARS blr 0.1, wd 0, warmup 10.
_base_ = ['./_base_.py']
