# CPU smoke run of iNaturalist 2019 fine-tuning on the shared mini copy (tiny ViT, 32 px).
_base_ = ['../finetune/smoke.py']
task = 'inat'
data = dict(type='inat2019', root='inat2019', num_classes=2)
