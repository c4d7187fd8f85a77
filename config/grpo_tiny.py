# GRPO on the quick-start model, offline on a CPU (about 11 minutes on 2 cores; docs/results.md, GRPO):
#   python train.py config/train_tiny.py                                              # -> out-tiny
#   python train.py config/sft_tiny.py --max_iters=750 --out_dir=out-tiny-sft750      # SFT stopped at step 750
#   python grpo.py config/grpo_tiny.py                                                # -> out-tiny-grpo
#   python chat.py --out_dir=out-tiny-grpo --eval_tasks=300
# It starts from the SFT stopped halfway through its schedule, while SFT is still improving: from the full SFT
# (compare and min at 0.9 and above) RL has little left to raise. The batch is what made it learn: with 16 prompts
# per step the training reward stayed flat for 150 steps at every stable learning rate (lr 1e-3 collapses the policy).
init_from = 'out-tiny-sft750'
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
