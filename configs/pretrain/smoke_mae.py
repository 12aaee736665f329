# Tiny MAE counterpart of smoke_crossmae.py (64 px, γ = p = 0.75, decoder 2 deep).
_base_ = ['./smoke_crossmae.py']
model = 'mae_vit_tiny_patch16'
kept_mask_ratio = None
weight_fm = False
use_input = False
