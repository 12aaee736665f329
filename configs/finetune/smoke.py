# CPU smoke run: the tiny test ViT at 32 px on the shared iNat-format copy (the shared data has no
# ImageFolder split with val/; point data.type='imagefolder' at an ImageNet root for the real run).
_base_ = ['./_base_.py']
arch = 'vit_tiny_patch16'
input_size = 32
data = dict(type='inat2019', root='inat2019', num_classes=2)
epochs = 2
total_batch_size = 16
warmup_epochs = 1
num_workers = 0
drop_path = 0.0
