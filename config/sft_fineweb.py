# Chat fine-tuning (SFT) of the real model on GPUs: from out-fineweb (python train.py config/train_fineweb.py).
#   python train.py config/sft_fineweb.py                 # or torchrun --standalone --nproc_per_node=8 ...
#   python chat.py --out_dir=out-fineweb-sft
# Data through `datasets` (downloaded once): smol-smoltalk (general chat, ~460k conversations) and GSM8K's worked
# grade-school maths (7.5k, calculator annotations removed), plus tasks.py's generated problems. Conversations
# longer than max_seq_len (1024) are dropped and counted. The model config comes from the checkpoint.
init_from = 'out-fineweb'
out_dir = 'out-fineweb-sft'
chat_data = 'smoltalk,gsm8k,tasks'
chat_tasks = 5000

batch_size = 16                   # rows of 1024 tokens, each packed with whole conversations
total_batch_size = 131072         # 8 GPUs x 16 x 1024: a quarter of pretraining's batch
max_iters = 2000                  # ~260M tokens of packed rows: about one pass over the data
learning_rate = 6e-5              # a tenth of pretraining's peak, decayed to zero
min_lr = 0.0
warmup_iters = 50
lr_decay_iters = 2000
eval_interval = 200
eval_iters = 20
log_interval = 10
sample_tokens = 0
chat_eval_interval = 500
chat_eval_n = 100
compile = True
# Frozen expert-bias update: SFT is short and its data narrower than pretraining's; re-balancing the routers on
# it would move tokens away from the experts that learned them (the load is still logged).
bias_update_speed = 0.0
