# ViT-S/16 linear probe with the ViT-B recipe (the CrossMAE paper reports S and B probes).
_base_ = ['./_base_.py']
arch = 'vit_small_patch16'
