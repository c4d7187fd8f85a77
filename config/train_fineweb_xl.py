# A model that outgrows DDP: config/train_fineweb.py's active compute (dim 768, 12 layers, 2 shared + 6 routed experts
# of width 256 per token, ~123M active parameters, the same FLOPs per token) with 384 routed experts instead of 64:
# 2.85B total parameters. Train it sharded (FSDP) on 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb_xl.py --fsdp=True
# (fsdp is left to the command line so that the config also runs, and is checked, in one process.)
#
# GPU memory per GPU at batch_size 16 x 1024, bf16, AdamW: computed, not measured (no GPU has run it). Weights,
# gradients and optimizer state exact (bench.state_bytes of this model); activations from `python bench.py
# config/train_fineweb.py --memory` (1.58 GB a sequence at the same active width) plus the router's fp32 scores of
# the 320 more experts (4 bytes x 320 a token in each of the 12 MoE layers: +0.016 GB a sequence).
#                                       DDP        FSDP, 8 GPUs
#   fp32 weights (2.85B x 4 bytes)     11.38 GB     1.42 GB   a shard
#   fp32 gradients                     11.38 GB    12.81 GB   the whole model's, unsharded, accumulated until the last
#                                                             micro-step's reduce-scatter (+ the 1.42 GB shard)
#   AdamW state (2 moments)            22.77 GB     2.85 GB   a shard
#   gathered / bf16 weight copies       5.61 GB     1.31 GB   FSDP: two bf16 blocks at a time + the fp32 root
#   activations (16 x 1.596 GB)        25.53 GB    25.53 GB
#   DDP's gradient buckets             11.38 GB        -
#   total                              88.07 GB    43.92 GB   + the CUDA context and the logits' gradient (3.3 GB)
# DDP does not fit an 80 GB GPU at this batch_size (on paper it would at batch_size <= 10, before those extras);
# FSDP leaves ~35 GB. With Muon (one momentum buffer): DDP 77.00 GB before the extras, FSDP 42.54 GB.
out_dir = 'out-fineweb-xl'
data_dir = 'data/fineweb_edu'

# model (ModelConfig fields; see model.py): config/train_fineweb.py's but for n_routed_experts
vocab_size = 50304
dim = 768
n_layers = 12
n_dense_layers = 1
n_heads = 12
inter_dim = 2048
moe_inter_dim = 256
q_lora_rank = 0
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_routed_experts = 384        # 6x train_fineweb's 64 (48 per GPU on 8): 2.85B parameters, 2.49B of them routed experts
n_shared_experts = 2
n_activated_experts = 6       # the same top-6: 2 shared + 6 routed of width 256 = one 2048-wide FFN per token
max_seq_len = 1024
n_mtp = 1
init_std = 0.006

# batch and schedule: config/train_fineweb.py's (16 x 1024 tokens per GPU micro-step, 2**19 tokens per step)
batch_size = 16
total_batch_size = 524288
max_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
lr_decay_iters = 19073
eval_interval = 250
eval_iters = 20
hellaswag_interval = 1000
log_interval = 10
compile = True
