# MAE fine-tuning protocol (facebookresearch/mae main_finetune.py; REFERENCE.md section 3).
# Values here are the ViT-B paper recipe; paper_vit_large.py / smoke.py override what differs.
task = 'finetune'
protocol = 'finetune'
family = 'finetune'                # which protocol family (used by transfer.inat / transfer.places)
arch = 'vit_base_patch16'          # crossmae.models.ARCHS name; None = infer from the checkpoint
input_size = 224
data = dict(type='imagefolder', root='imagenet', num_classes=1000, train_split='train', val_split='val',
            check_files=True)
epochs = 100
total_batch_size = 1024            # effective batch per optimizer step = batch_size x accum_iter x GPUs
batch_size = None                  # per GPU; None: total_batch_size / (GPUs x accum_iter)
accum_iter = None                  # micro-batches per optimizer step; None: derived (1 when batch_size is None)
blr = 5e-4                         # lr = blr * total_batch_size / 256
lr = None                          # absolute lr; overrides blr when set
min_lr = 1e-6
warmup_epochs = 5
weight_decay = 0.05
layer_decay = 0.65
drop_path = 0.1
clip_grad = None
global_pool = 'avg'                # mean of patch tokens + fc_norm (MAE --global_pool)
head_init_std = 2e-5               # trunc_normal_(head.weight, std=2e-5)
smoothing = 0.1
mixup = 0.8
cutmix = 1.0
cutmix_minmax = None
mixup_prob = 1.0
mixup_switch_prob = 0.5
mixup_mode = 'batch'
aug = dict(auto_augment='rand-m9-mstd0.5-inc1', color_jitter=None, reprob=0.25, remode='pixel', recount=1)
amp = True                         # bf16 autocast on CUDA (no effect on CPU)
compile = False                    # torch.compile the model (True = inductor, or a backend name; in place)
num_workers = 10
eval_period = 1                    # epochs between evaluations (0: after the last epoch only)
snapshot_period = 0                # periodic checkpoint-<epoch>.pth every N epochs (0: latest only)
keep_checkpoints = 1
seed = 0
deterministic = False
