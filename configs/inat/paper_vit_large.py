# iNaturalist 2019 fine-tuning with the MAE ViT-Large fine-tuning recipe (REFERENCE.md section 3: no
# dataset-specific recipe is published in the MAE repository).
_base_ = ['../finetune/paper_vit_large.py']
task = 'inat'
data = dict(type='inat2019', root='inat2019', num_classes=1010)
