# CPU smoke run: the tiny test ViT at 32 px on the shared iNat-format copy.
_base_ = ['./_base_.py']
arch = 'vit_tiny_patch16'
input_size = 32
data = dict(type='inat2019', root='inat2019', num_classes=2)
epochs = 3
total_batch_size = 16
warmup_epochs = 1
num_workers = 0
extract_batch_size = 64
fast = dict(blrs=[0.1, 1.0, 10.0], holdout_fraction=0.25)
