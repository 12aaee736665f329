# CPU smoke run of the iNaturalist 2019 linear probe on the shared mini copy (tiny ViT, 32 px).
_base_ = ['../linprobe/smoke.py']
task = 'inat'
data = dict(type='inat2019', root='inat2019', num_classes=2)
