# CrossMAE ViT-S/16 (decoder 256 wide), γ 0.75, 800 epochs (paper FT 79.3).
_base_ = ['./_base_.py']
model = 'crossmae_vit_small_patch16'
