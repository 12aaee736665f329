# Tiny CrossMAE (vit_tiny_patch16: 64 wide, 4 deep; decoder 64 wide, 2 deep) at 64 px on the bundled
# 200-image ImageNet subset: γ 0.25 (4 visible, 8 dropped, 4 predicted of 16 patches), inter-block
# attention over all blocks + input. A couple of CPU minutes; checks the pipeline, not quality.
_base_ = ['./_base_.py']
model = 'crossmae_vit_tiny_patch16'
input_size = 64
kept_mask_ratio = 0.25
decoder_depth = 2
total_batch_size = 32
batch_size = 16
epochs = 4
blr = 1.5e-2                          # larger than the paper so the tiny model visibly learns in 24 steps
warmup_epochs = 1
num_workers = 2
pin_mem = False
verify_images = True
snapshot_period = 1                    # a snapshot every epoch: the main job probes each one (slurm.watch)
log_period = 5
