# Chat fine-tuning (SFT) of the quick-start model: offline, about 11 minutes on 2 quiet CPU cores.
#   python train.py config/train_tiny.py       # pretrain -> out-tiny
#   python train.py config/sft_tiny.py         # SFT -> out-tiny-sft
#   python chat.py --out_dir=out-tiny-sft --eval_tasks=300
# The data: tasks.py's generated problems (compare, min, sort on the numbers 0-99, replies that copy the question's
# tokens) and the bundled plain conversations; the loss is on the assistant's replies only. The model config comes
# from the checkpoint, and so does the tokenizer's chat format (its special tokens use spare vocab rows).
# What it learns and when (docs/results.md): the format in ~50 steps, then nothing for ~600 steps, until the model
# learns to copy a number token of the question into its reply; from then on it nearly always copies the right one.
init_from = 'out-tiny'
out_dir = 'out-tiny-sft'
chat_data = 'tasks,data/chat_sample.jsonl'
chat_tasks = 8000                 # training problems per task: most of compare's ~8,900 training questions
chat_drills = 4000                # "Repeat: 41" -> "Repeated: 41.": copying, the skill every task waits for
device = 'cpu'
dtype = 'float32'
compile = False

batch_size = 8                    # 8 rows of 128 tokens, each holding ~6 conversations
total_batch_size = 1024
max_iters = 1500
learning_rate = 3e-3              # a third of the pretraining peak (1e-2 learned no faster)
min_lr = 3e-4
warmup_iters = 20
lr_decay_iters = 1500
eval_interval = 250
eval_iters = 0                    # the whole held-out split (~420 rows) once, per reply token: a sample of 8
                                  # batches (15% of it) put a LoRA run 24% behind full SFT, the whole split 1% ahead
log_interval = 50
sample_tokens = 0
chat_eval_interval = 1500         # held-out greedy exact match (and the prior rules) at steps 0 and 1500
chat_eval_n = 100
# The expert-bias update is frozen: SFT is short and narrow (number tokens), and re-balancing the routers on it
# would move tokens away from the experts that learned them in pretraining.
bias_update_speed = 0.0
