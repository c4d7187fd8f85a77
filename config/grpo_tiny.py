# GRPO on the quick-start model, offline on a CPU (about 15-20 minutes on one shared core; docs/results.md, GRPO):
#   python train.py config/train_tiny.py                                              # -> out-tiny
#   python train.py config/sft_tiny.py --max_iters=1000 --out_dir=out-tiny-sft1000    # SFT stopped at step 1000
#   python grpo.py config/grpo_tiny.py                                                # -> out-tiny-grpo
#   python chat.py --out_dir=out-tiny-grpo --eval_tasks=300
# Measured (300 held-out problems per task, chat.py): min 0.56 -> 0.67 greedy, 0.35 -> 0.48 sampled pass@1 in 40
# steps, compare 0.71 -> 0.76, sort 0.04 -> 0.04. It starts from the SFT stopped at step 1000 of its 1500-step
# schedule, while SFT is still improving; from the full SFT, min had stopped improving there too (0.80 at steps
# 1250 and 1500), and RL moved little. The batch is what made it learn: with 16 prompts per step the training
# reward stayed flat for 150 steps at every stable learning rate (lr 1e-3 collapses the policy).
init_from = 'out-tiny-sft1000'
out_dir = 'out-tiny-grpo'
device = 'cpu'
dtype = 'float32'

prompts = 'compare,min,sort'      # all three: on compare alone, min fell 0.77 -> 0.54 and sort 0.21 -> 0.07 in 50
                                  # steps (the tasks share the copying); rewarded, min and sort hold
rewards = 'correct'
group_size = 8
prompts_per_step = 128            # ~43 prompts per task: 16 (5 per task) gave a gradient too noisy to learn from
max_new_tokens = 12               # "Sorted: 7, 41, 63." is 9 tokens and EOS; a longer reply is wrong anyway
ppo_epochs = 2                    # each batch of rollouts (half of a step's time) is used twice (rho != 1)
beta = 0.3                        # a strong pull to the SFT model: min and sort must not drift (docs/results.md)
learning_rate = 3e-4              # 1e-4 moved nothing in 100 steps of 16 prompts; 1e-3 collapses
max_iters = 40
eval_interval = 20
eval_n = 100                      # held-out problems per task at each eval (chat.py --eval_tasks=300 for the record)
eval_samples = 4                  # sampled pass@1 over 4 replies per problem at temperature 1
log_interval = 1
