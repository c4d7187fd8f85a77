# The small CPU config (and the base of the ablations in docs/results.md): a DeepSeek-V3-style MoE that trains in about
# 5 minutes on one CPU core, on the OpenStax textbooks (or any corpus tokenized into data_dir):
#   python data/fineweb.py --input path/to/openstax --out_dir data/openstax --shard_size 2000000
#   python train.py config/train_small.py
# Three settings differ from the big config, each chosen by the measurements in docs/results.md (ablations):
# Muon instead of AdamW, no MTP module (at dim 128 its second 50,304-way head nearly doubles the step time), and a
# 10x faster expert-bias update (at 1e-3 the routing stays collapsed for a 200-step run).
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
n_mtp = 0
init_std = 0.02
bias_update_speed = 1e-2

batch_size = 4
total_batch_size = 1024       # 4 x 256 tokens per step: 200 steps = 204,800 tokens
max_iters = 200
optimizer = 'muon'
learning_rate = 1.2e-2        # Muon here: 1.2e-2 beat 6e-3 (docs/results.md); AdamW's best was 3e-3
min_lr = 1.2e-3
warmup_iters = 20
lr_decay_iters = 200
eval_interval = 100
eval_iters = 16               # the same 16 x 4 x 256 = 16,384 val tokens at every eval, in every run
log_interval = 10
sample_tokens = 0
