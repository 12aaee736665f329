# CrossMAE ViT-B/16 with prediction ratio γ = 0.25 (paper Table 1 "CrossMAE (0.25)", FT 83.5);
# lr is scaled by γ/p = 1/3 (App. A.6).
_base_ = ['./_base_.py']
kept_mask_ratio = 0.25
