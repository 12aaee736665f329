# ViT-L/16 ImageNet-1k fine-tuning, MAE paper recipe: 50 ep, blr 1e-3, layer decay 0.75, drop path 0.2.
_base_ = ['./_base_.py']
arch = 'vit_large_patch16'
epochs = 50
blr = 1e-3
layer_decay = 0.75
drop_path = 0.2
