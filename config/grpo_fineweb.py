# GRPO of the real model on GSM8K, on GPUs: from out-fineweb-sft (python train.py config/sft_fineweb.py).
#   python grpo.py config/grpo_fineweb.py                 # or torchrun --standalone --nproc_per_node=8 ...
#   python chat.py --out_dir=out-fineweb-grpo --eval_gsm8k=1319
# Prompts: GSM8K's train split through datasets (downloaded once); reward 1 when the reply's last number is the
# reference's final answer (the SFT data ends every worked answer with "The answer is N."). Not measured yet: no GPU
# run has happened; the settings follow DeepSeekMath's GRPO (KL 0.04, one update per batch of rollouts, clip 0.2)
# with smaller groups and batches for a 578M-parameter model.
init_from = 'out-fineweb-sft'
out_dir = 'out-fineweb-grpo'

prompts = 'gsm8k'
rewards = 'correct'               # not 'format' (R1-Zero's <think> tags): the SFT data has none, it would stay 0
group_size = 16                   # DeepSeekMath: 64
prompts_per_step = 64             # 8 prompts x 16 completions per GPU on 8 GPUs
max_new_tokens = 384              # GSM8K's worked answers are ~100-200 tokens
temperature = 1.0
ppo_epochs = 1                    # DeepSeekMath: a single update per exploration stage
beta = 0.04
clip_eps = 0.2
loss_norm = 'token'
learning_rate = 1e-6              # DeepSeekMath's policy lr
warmup_iters = 10
max_iters = 500
eval_interval = 100
eval_n = 100                      # tasks.py's tasks too: RL on GSM8K should not cost them
eval_gsm8k = 100                  # GSM8K test problems (greedy, up to 256 new tokens each, one at a time on rank 0
                                  # while the other ranks wait in their next collective: keep it well under NCCL's
                                  # 10-minute timeout; python chat.py --eval_gsm8k=1319 scores the whole test split)
log_interval = 1
