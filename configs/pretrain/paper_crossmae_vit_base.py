# CrossMAE ViT-B/16, prediction ratio 0.75, decoder depth 12, inter-block attention over all
# encoder blocks + input, 800 epochs (paper Table 1 / official ViT-B checkpoint; FT target 83.7).
_base_ = ['./_base_.py']
