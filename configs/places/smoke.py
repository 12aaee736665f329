# CPU smoke run of Places365-Standard fine-tuning on the shared mini copy (tiny ViT, 32 px).
_base_ = ['../finetune/smoke.py']
task = 'places'
data = dict(type='places365', root='places365', num_classes=365)
