# ViT-B/16 ImageNet-1k fine-tuning, MAE paper recipe: 100 ep, batch 1024, blr 5e-4, layer decay 0.65,
# drop path 0.1 (REFERENCE.md section 3).
_base_ = ['./_base_.py']
