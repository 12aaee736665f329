# MAE ViT-L/16 baseline, 800 epochs (paper FT 85.4).
_base_ = ['./paper_mae_vit_base.py']
model = 'mae_vit_large_patch16'
batch_size = 128
