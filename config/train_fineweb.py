# The real run: a DeepSeek-V3-style MoE with about GPT-2-small (124M) active compute, on FineWeb-Edu sample-10BT.
#   python data/fineweb.py && python train.py config/train_fineweb.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py
# ~0.58B total / 121M active parameters (embedding excluded), 0.87 GFLOP/token (+0.29 for the MTP module).
out_dir = 'out-fineweb'
data_dir = 'data/fineweb_edu'

# model (ModelConfig fields; see model.py)
vocab_size = 50304            # GPT-2's 50257 padded to a multiple of 64
dim = 768
n_layers = 12
n_dense_layers = 1            # like V2-Lite / DeepSeekMoE 16B
n_heads = 12
inter_dim = 2048              # dense SwiGLU, ~ GPT-2's 4*768 MLP in FLOPs (3 matrices of 2048 instead of 2 of 3072)
moe_inter_dim = 256           # fine-grained experts: 1/8 of the dense FFN width
q_lora_rank = 0               # no query compression at this width (as V2-Lite): it would save <20% of wq
kv_lora_rank = 256            # latent cache: 256 + 32 numbers per token per layer
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_routed_experts = 64
n_shared_experts = 2
n_activated_experts = 6       # 2 shared + 6 routed of width 256 = one 2048-wide FFN per token
max_seq_len = 1024
n_mtp = 1
init_std = 0.006

# batch: 16 x 1024 tokens per GPU micro-step, gradient accumulation up to 2**19 = 524,288 tokens per step
batch_size = 16
total_batch_size = 524288
# 10B tokens (one epoch of sample-10BT) / 524,288 = 19,073 steps
max_iters = 19073
# AdamW: build-nanogpt's GPT-2-124M schedule at this batch size (6e-4, 715 warmup steps, cosine to 10%)
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
lr_decay_iters = 19073
eval_interval = 250
eval_iters = 20
hellaswag_interval = 1000
log_interval = 10
compile = True
