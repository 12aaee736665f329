# Places365-Standard fine-tuning with the MAE ViT-Large fine-tuning recipe (REFERENCE.md section 3: no
# dataset-specific recipe is published in the MAE repository).
_base_ = ['../finetune/paper_vit_large.py']
task = 'places'
data = dict(type='places365', root='places365', num_classes=365)
