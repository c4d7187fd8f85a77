# Chat fine-tuning (SFT) of the quick-start model: offline, a few minutes on a CPU.
#   python train.py config/train_tiny.py       # pretrain -> out-tiny
#   python train.py config/sft_tiny.py         # SFT -> out-tiny-sft
#   python chat.py --out_dir=out-tiny-sft
# The data: tasks.py's generated problems (addition, subtraction, spelling backwards, counting letters, sorting,
# comparing) and the bundled plain conversations; the loss is on the assistant's replies only. The model config
# comes from the checkpoint, and so does the tokenizer's chat format (its special tokens use spare vocab rows).
init_from = 'out-tiny'
out_dir = 'out-tiny-sft'
chat_data = 'tasks,data/chat_sample.jsonl'
chat_tasks = 2000                 # training problems per task (reverse has only ~310)
device = 'cpu'
dtype = 'float32'
compile = False

batch_size = 8                    # 8 rows of 128 tokens, each holding several conversations
total_batch_size = 1024
max_iters = 300
learning_rate = 3e-3              # a third of the pretraining peak: the model keeps what it knows
min_lr = 3e-4
warmup_iters = 20
lr_decay_iters = 300
eval_interval = 50
eval_iters = 8                    # all 8 x 8 rows of held-out conversations
log_interval = 10
sample_tokens = 0
chat_eval_interval = 300          # greedy exact match on 20 held-out problems per task at steps 0 and 300
chat_eval_n = 20
# The expert-bias update is frozen: SFT is short and narrow (digits and short words), and re-balancing the
# routers on it would move tokens away from the experts that learned them in pretraining.
bias_update_speed = 0.0
