# CPU smoke run: a few minutes on 2 cores, offline, nothing to prepare:
#   python train.py config/train_tiny.py
# data_dir is the bundled 150-document FineWeb-Edu sample (data/fineweb_edu_sample.jsonl.gz); train.py tokenizes
# it into data/fineweb_edu_sample/ on first use (1 val + 4 train shards of 20,000 tokens, about a second).
# Same architecture as train_fineweb.py, shrunk: ~0.4M non-embedding parameters (+2 x 3.2M embedding/head).
out_dir = 'out-tiny'
data_dir = 'data/fineweb_edu_sample'
device = 'cpu'
dtype = 'float32'
compile = False

vocab_size = 50304
dim = 64
n_layers = 4
n_dense_layers = 1
n_heads = 4
inter_dim = 192
moe_inter_dim = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
n_routed_experts = 16
n_shared_experts = 1
n_activated_experts = 4
max_seq_len = 128
n_mtp = 1
init_std = 0.02               # the papers' 0.006 is tuned for dim 7168; a 64-wide toy learns faster at 0.02

batch_size = 4
total_batch_size = 1024       # 2 micro-steps of 4 x 128: gradient accumulation is exercised too
max_iters = 200
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 20
lr_decay_iters = 200
eval_interval = 50
eval_iters = 5
log_interval = 10
sample_tokens = 24
