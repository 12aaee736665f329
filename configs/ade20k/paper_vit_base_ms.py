# UperNet + ViT-B/16 on ADE20K with the multi-scale + flip test: mmsegmentation 1.2.2
# configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512-ms.py (its note: ratios
# 0.5 ... 1.75 of the (2048, 512) test scale) with the flips of _base_/datasets/ade20k.py's
# tta_pipeline; training is the paper_vit_base recipe. Tied to those files by tests/test_ade20k_recipe.py.
_base_ = ['./paper_vit_base.py']

protocol = 'upernet_ade20k_160k_ms'
test = dict(aug_ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
