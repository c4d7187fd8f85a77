# GRPO on the chat-tuned quick-start model: offline, minutes on a CPU.
#   python train.py config/train_tiny.py       # pretrain -> out-tiny
#   python train.py config/sft_tiny.py         # SFT -> out-tiny-sft
#   python grpo.py config/grpo_tiny.py         # GRPO -> out-tiny-grpo
#   python chat.py --out_dir=out-tiny-grpo --eval_tasks=50
# The prompts are tasks.py's letter-counting problems: the one task where the SFT model's sampled replies are right
# often enough (about half of them at temperature 1) to give a group of 8 different rewards. On compare it samples
# a right answer 0.6% of the time, on the other tasks never: every group's rewards would be equal, advantages 0.
init_from = 'out-tiny-sft'
out_dir = 'out-tiny-grpo'
device = 'cpu'
dtype = 'float32'

prompts = 'compare'
rewards = 'correct'
group_size = 8
prompts_per_step = 16
max_new_tokens = 8                # replies are 1-2 tokens and EOS; a longer one is wrong anyway
ppo_epochs = 2                    # each batch of rollouts (half of a step's time) is used twice (rho != 1)
# beta 0.3: at 0.04 (lr 1e-4) the policy collapsed onto the majority answer '1' and stopped learning; a stronger
# pull to the SFT model keeps it sampling both 0 and 1 long enough to learn which letters mean 0 (docs/results.md)
beta = 0.3
learning_rate = 3e-4
max_iters = 200
eval_interval = 50
eval_n = 100                      # held-out problems per task: count's first 100 have the generator's mix
log_interval = 10
