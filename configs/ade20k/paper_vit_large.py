# UperNet + ViT-L/16 on ADE20K. mmsegmentation has no MAE ViT-L config; the size-dependent values
# follow its BEiT-L UperNet config (configs/beit/beit-large_upernet_8xb1-amp-160k_ade20k-640x640.py):
# out_indices (7, 11, 15, 23), drop path 0.2, neck/head width 1024. The crop, schedule, lr and
# layer decay stay those of the MAE ViT-B recipe (MAE paper: same recipe for B and L).
_base_ = ['./paper_vit_base.py']

protocol = 'upernet_ade20k_160k_vit_large'
model = dict(embed_dim=1024, depth=24, num_heads=16, out_indices=(7, 11, 15, 23), drop_path_rate=0.2,
             channels=1024)
