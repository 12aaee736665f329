# MAE ViT-B/16 baseline (He et al. 2022): 8-block self-attention decoder, final encoder norm,
# every masked patch predicted (γ = p, so the lr factor is 1), 800 epochs (paper FT 83.3).
_base_ = ['./_base_.py']
model = 'mae_vit_base_patch16'
kept_mask_ratio = None
decoder_depth = 8
weight_fm = False
use_input = False
