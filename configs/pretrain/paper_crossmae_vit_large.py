# CrossMAE ViT-L/16, γ 0.75, 800 epochs (paper FT 85.4).
_base_ = ['./_base_.py']
model = 'crossmae_vit_large_patch16'
batch_size = 128
