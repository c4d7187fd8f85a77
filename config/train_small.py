# The ablation config: a small DeepSeek-V3-style MoE that trains in ~10 minutes per run on a 2-core CPU, on
# the OpenStax textbooks (or any corpus tokenized with data/fineweb.py --input into data_dir).
#   python data/fineweb.py --input path/to/openstax --out_dir data/openstax --shard_size 2000000
#   python train.py config/train_small.py
out_dir = 'out-small'
data_dir = 'data/openstax'
device = 'cpu'
dtype = 'float32'
compile = False

vocab_size = 50304
dim = 128
n_layers = 4
n_dense_layers = 1
n_heads = 4
inter_dim = 384               # = (n_shared_experts + n_activated_experts) * moe_inter_dim: equal FLOPs per layer
moe_inter_dim = 96
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
n_routed_experts = 16
n_shared_experts = 1
n_activated_experts = 3
max_seq_len = 256
n_mtp = 1
init_std = 0.02

batch_size = 4
total_batch_size = 1024       # 4 x 256 tokens per step: 300 steps = 307,200 tokens
max_iters = 300
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
lr_decay_iters = 300
eval_interval = 75
eval_iters = 16           # the same 16 x 4 x 256 = 16,384 val tokens at every eval, in every run
log_interval = 10
sample_tokens = 0
