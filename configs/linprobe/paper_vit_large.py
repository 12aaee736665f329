# ViT-L/16 ImageNet-1k linear probe, MAE recipe: 50 ep (MAE LINPROBE: ViT-L/H 50 epochs), same optimiser.
_base_ = ['./_base_.py']
arch = 'vit_large_patch16'
epochs = 50
