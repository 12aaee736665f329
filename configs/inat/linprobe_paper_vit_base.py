# iNaturalist 2019 linear probe with the MAE ViT-Base linear-probe recipe (protocol=mae; set protocol=fast for
# the cached multi-head probe).
_base_ = ['../linprobe/paper_vit_base.py']
task = 'inat'
data = dict(type='inat2019', root='inat2019', num_classes=1010)
