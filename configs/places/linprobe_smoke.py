# CPU smoke run of the Places365-Standard linear probe on the shared mini copy (tiny ViT, 32 px).
_base_ = ['../linprobe/smoke.py']
task = 'places'
data = dict(type='places365', root='places365', num_classes=365)
