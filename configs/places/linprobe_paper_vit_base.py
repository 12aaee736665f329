# Places365-Standard linear probe with the MAE ViT-Base linear-probe recipe (protocol=mae; set protocol=fast for
# the cached multi-head probe).
_base_ = ['../linprobe/paper_vit_base.py']
task = 'places'
data = dict(type='places365', root='places365', num_classes=365)
