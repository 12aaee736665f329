# Paper pretraining recipe (CrossMAE App. A.6 Table 10 = MAE's): CrossMAE ViT-B/16, 800 epochs.
# Every key can be overridden with `--cfg-options key=value`. Names follow the official
# main_pretrain.py arguments where one exists.

# --- model ------------------------------------------------------------------------------------
model = 'crossmae_vit_base_patch16'   # mae_<arch> | crossmae_<arch>, arch in crossmae.models.ARCHS
input_size = 224                      # pixels; must be divisible by the patch size
mask_ratio = 0.75                     # p
kept_mask_ratio = 0.75                # prediction ratio γ (fraction of ALL patches), 0 < γ <= p; None = p
decoder_depth = 12                    # paper default for CrossMAE (MAE: 8)
weight_fm = True                      # inter-block attention
use_fm = [-1]                         # encoder blocks fused; [-1] = all
use_input = True                      # also fuse the patch-embedding output (official "-ui" checkpoints)
fm_mode = 'linear'                    # linear | softmax (Table 8) | lp (Table 9)
inter_block_init = 'xavier_uniform'   # xavier_uniform (what the official code trains from: its later
                                      # self.apply(_init_weights) overwrites the N(0, 1/sqrt(k)) draw) | normal
self_attn = False                     # decoder self-attention among queries (Table 3a ablation)
norm_pix_loss = True
masking = 'random'                    # random | grid
attn_impl = 'sdpa'
compile = False                       # torch.compile the model (True = inductor, or a backend name; in place)

# --- optimisation -----------------------------------------------------------------------------
total_batch_size = 4096               # effective batch; accum_iter = total / (batch_size * world)
batch_size = 256                      # per GPU (per process)
accum_iter = None                     # None: derived from total_batch_size; else used when total is None
epochs = 800
warmup_epochs = 40
blr = 1.5e-4                          # base lr per 256 images
lr = None                             # absolute lr; None: blr * total/256 * γ/p
lr_scale_by_ratio = True              # the γ/p factor (official --no_lr_scale disables it)
min_lr = 0.0
weight_decay = 0.05                   # not applied to biases and 1-D params (norms); applied to cls_token,
                                      # mask_token and wfm.linear.weight, as both official codes
betas = (0.9, 0.95)
amp = 'bf16'                          # bf16 | fp16 | none (autocast on CUDA only; CPU runs fp32)

# --- data ---------------------------------------------------------------------------------------
data_subdir = 'imagenet/train'        # ImageFolder below --data-root
data_subset = None                    # use only N images (smoke runs)
verify_images = False                 # decode every image before training (slow on full ImageNet)
data_pipeline = 'cpu'                 # cpu | gpu (workers read bytes; decode + augment on CUDA) | auto
decoder = 'pil'                       # CPU path's JPEG decoder: pil | torchvision (same pixels; docs/benchmarks.md)
num_workers = 10
pin_mem = True

# --- run ----------------------------------------------------------------------------------------
seed = 0
deterministic = False                 # torch deterministic kernels (warn_only)
find_unused_parameters = False
checkpoint_period = 1                 # epochs between checkpoint-latest.pth writes
snapshot_period = 100                 # epochs between kept checkpoint-<epoch>.pth snapshots (0: only the final one)
log_period = 20                       # iterations between log lines
tensorboard = True
