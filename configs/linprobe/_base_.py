# Linear probing (facebookresearch/mae main_linprobe.py; REFERENCE.md section 3). ViT-B paper values.
task = 'linprobe'
protocol = 'mae'                   # mae | fast | blocks | knn (see docs/classification.md)
family = 'linprobe'
arch = 'vit_base_patch16'
input_size = 224
data = dict(type='imagefolder', root='imagenet', num_classes=1000, train_split='train', val_split='val',
            check_files=True)
global_pool = 'token'              # mae protocol pooling: token (cls) | avg
epochs = 90
total_batch_size = 16384           # effective batch per optimizer step = batch_size x accum_iter x GPUs
batch_size = None                  # per GPU; None: total_batch_size / (GPUs x accum_iter)
accum_iter = None                  # micro-batches per optimizer step; None: derived (1 when batch_size is None)
blr = 0.1                          # lr = blr * total_batch_size / 256, LARS
lr = None
min_lr = 0.0
warmup_epochs = 10
weight_decay = 0.0
amp = True
num_workers = 10
eval_period = 1
extract_batch_size = 256
seed = 0
deterministic = False
# fast cached multi-head probe (protocol fast / blocks): same LARS + schedule per head
fast = dict(blrs=[0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2], pools=['token', 'avg'], layers=['last', 'last4'],
            epochs=None,            # None: same as `epochs`
            batch_size=None,        # None: the total_batch_size (one process)
            warmup_epochs=None,     # None: same as `warmup_epochs`
            holdout_fraction=0.1,   # part of TRAIN held out for choosing the head (val never used)
            checkpoint_period=10,
            cache_dir=None)         # None: $CROSSMAE_FEATURE_CACHE or ~/.cache/crossmae/features
knn = dict(k=20, temperature=0.07, pooling='token')
