"""
GRPO, Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300, sec. 4.1; the RL of DeepSeek-R1,
arXiv 2501.12948), on a chat-tuned checkpoint, with rule-based rewards:

    python grpo.py config/grpo_tiny.py          # out-tiny-sft -> out-tiny-grpo: offline, minutes on a CPU
    python grpo.py config/grpo_fineweb.py       # GSM8K through datasets, from out-fineweb-sft
    torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_fineweb.py

One step, for prompts_per_step prompts q (split across DDP ranks):
  1. rollouts   G = group_size completions o_1..o_G of q from the current policy (pi_old), sampled at `temperature`
                through the cached MLA decoder (model.decode, all G rows of a prompt in one batch), each cut at
                max_new_tokens; a completion that never ends (no EOS) gets reward 0;
  2. rewards    r_i = sum of weight * f(prompt, completion) over the reward functions named in `rewards` (REWARDS);
  3. advantage  every token of o_i gets A_i = (r_i - mean(r)) / (std(r) + eps) (std_normalize=False: r_i - mean(r),
                Dr. GRPO's unbiased variant), so a group whose rewards are all equal teaches nothing;
  4. update     ppo_epochs (mu) AdamW steps over the same rollouts, each maximising DeepSeekMath's eq. 3:
                    mean over completion tokens of  min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A) - beta KL
                with rho = pi_theta(o_t) / pi_old(o_t) per token and KL the unbiased k3 estimator of
                KL(pi_theta || pi_ref) against the frozen starting model pi_ref (beta = 0: no reference model is
                kept); both terms bounded (dual_clip for A < 0, k3 capped at K3_MAX). Only completion tokens (up to and including EOS) carry loss: prompts and padding are masked.

Choices, with their reasons:
  - loss_norm='token' (default, DAPO): the sum over every completion token of the step divided by their number, so
    each token weighs the same. 'sequence' is the paper's 1/G sum_i 1/|o_i| sum_t: a token of a short completion
    weighs more than one of a long one, so a wrong answer is penalised less per token the longer it is (Dr. GRPO's
    length bias), which matters for long GSM8K reasoning; on the tasks' replies of a few tokens the two barely differ.
  - std: the group's population standard deviation (its own spread, not an estimate of another's), eps 1e-4.
  - log-probs from the main head only, over the chat vocabulary (the first EOS + 1 ids, as sampled) at the sampling
    temperature: pi is exactly the distribution the completions were drawn from (top_k, if set, is not in it, as in
    TRL). pi_old is the first epoch's own forward (before any step the policy is pi_old), not the decode path: rho
    is 1 exactly at the first epoch, and no separate forward is spent on it.
  - frozen: the router weights (gate.weight), the expert-bias update (never called) and the MTP modules. A few
    hundred narrow prompts would move the routers and re-balance load onto a few experts; the bias balancer needs
    the load of a broad distribution, and the counters it reads are not even updated here (the model stays in eval
    mode: it has no dropout, and train mode only adds the balance loss and the counters). The MTP modules take no
    part in the main head's log-probs; they stay as SFT left them (their drafts still verify against the new policy,
    so speculative decoding stays exact, only its acceptance rate may change).
  - lora_rank > 0 trains LoRA adapters (lora.py) on the frozen policy instead: the checkpoint holds the adapters
    with the path and hash (lora.checkpoint_hash) of the checkpoint they were trained on, and every reader merges
    them on load. The reference is still a separate frozen copy of the starting weights.
  - AdamW (optim.build_optimizer's, on the trainable parameters), constant learning rate after warmup_iters, no
    weight decay (the KL term is what holds the policy near the reference), gradient clipping. Not Muon: GRPO's
    gradients are noisy and sparse (one advantage per completion), and every GRPO recipe's lr is AdamW's.
  - the sampling RNG is one generator, the same on every rank, that picks each step's prompts and one seed per
    prompt: a prompt's completions are the same whichever rank samples them, so a run on N processes samples what
    one process samples, and a resume continues it exactly (the generator's state is in the checkpoint).
  - DDP: each rank samples and scores its prompts; the loss normalisers (tokens or sequences of the whole step) and
    the statistics are all-reduced, and the gradients summed, so every rank applies the same update. No DDP wrapper:
    the gradients are all-reduced once per optimizer step, after all its micro-batches (one per prompt group).

Logs: a line per step (mean reward, each reward function's and each prompt source's, completion length with its EOS,
the fraction that ended; per completion token the KL to pi_ref and the entropy of the sampling policy, the fraction
of tokens whose gradient the clip stopped; sampled tokens/s); every eval_interval the held-out tasks (chat.evaluate,
the numbers `python chat.py --eval_tasks=N` prints: greedy exact match, sampled pass@1 over eval_samples replies at
the policy's temperature, the best answer-prior rule, which an accuracy must beat); out_dir/log.jsonl and eval.jsonl
(task_<t>, task_<t>_pass1, task_<t>_prior; `python plot.py out-tiny-grpo --x=step` draws reward and accuracy);
out_dir/ckpt.pt: a normal model checkpoint (chat.py, sample.py, export.py read it) plus the optimizer, the step, the
sampling RNG and the reference model's path and fingerprint (init_from='resume' continues exactly).

The code reads top to bottom: settings, rewards, prompts, the algorithm's pieces, then the run: check_settings and
setup (r, the run's state), one step (rollouts_and_rewards: 1-3; update: 4), evaluation and checkpoints, and the
loop in run().
"""
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tasks
from checkpoint import fingerprint, load_checkpoint, load_lora_base, load_weights, save_checkpoint
from configurator import UserError, configure, config_keys
from data.loader import (ASSISTANT, BOS, EOS, atomic_write, get_tokenizer, hub_conversations, hub_offline_reason,
                         render_prompt)
from model import ModelConfig, Transformer, autocast_context, check_device, init_distributed
from lora import TARGETS, add_lora, adapter_state, checkpoint_hash, load_adapters
from optim import build_optimizer
from sample import sample_probs

# -----------------------------------------------------------------------------------------------------------------
# I/O
out_dir = 'out-grpo'
init_from = 'out-tiny-sft'       # a chat-tuned out_dir (the policy's start and the reference model) | 'resume'
# prompts and rewards
prompts = 'compare'              # comma-separated prompt sources: tasks.py task names, 'gsm8k' (through datasets);
                                 # name:k puts a source's prompts k times in the pool (drawn k times as often)
task_problems = 2000             # training problems per task in the prompt pool (tasks.problems, split 'train')
rewards = 'correct'              # comma-separated reward functions of REWARDS, each name or name:weight
# GRPO
group_size = 8                   # G, completions per prompt
prompts_per_step = 16            # prompts per step, over all ranks (a multiple of the number of processes)
max_new_tokens = 16              # a completion is cut here (and rewarded 0 if it has not ended)
temperature = 1.0                # sampling temperature (> 0), also the one the log-probs are taken at
top_k = 0                        # 0: off
ppo_epochs = 1                   # mu, optimizer steps per batch of rollouts (1: on-policy, rho = 1)
clip_eps = 0.2                   # PPO's clip range: rho in [1 - clip_eps, 1 + clip_eps]
dual_clip = 3.0                  # A < 0: the objective is at least dual_clip * A (dual-clip PPO); 0: off
beta = 0.04                      # KL(pi_theta || pi_ref) coefficient; 0 keeps no reference model
std_normalize = True             # A = (r - mean) / (std + eps); False: r - mean (Dr. GRPO)
loss_norm = 'token'              # 'token' (DAPO: every completion token weighs the same) | 'sequence' (the paper)
max_iters = 100                  # GRPO steps (each: rollouts, then ppo_epochs optimizer steps)
# optimizer
learning_rate = 1e-5
warmup_iters = 0                 # linear warmup, then constant
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0                  # 0: off
# LoRA (lora.py): train adapters on the frozen policy instead of its weights (the checkpoint then holds them only)
lora_rank = 0                    # 0: off
lora_alpha = 16.0
lora_targets = ','.join(TARGETS)
lora_experts = False
# evaluation, logging
eval_interval = 50               # steps between held-out evals and checkpoints (and at the first and last step)
eval_n = 50                      # held-out problems per task (chat.evaluate); 0: no task eval
eval_samples = 8                 # sampled pass@1 over this many replies per problem at `temperature` (0: greedy only)
eval_gsm8k = 0                   # GSM8K test problems per eval (chat.evaluate_gsm8k), 0: off
log_interval = 1
seed = 1337                      # sampling; also chat.py's default, so the held-out problems are chat.py's
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
# -----------------------------------------------------------------------------------------------------------------
_SETTINGS = config_keys(globals())
ADV_EPS = 1e-4


# ---- rewards: plain functions of (prompt, completion text) -> float, registered by name ------------------------
# A prompt is a dict: "messages" (the conversation up to the user's question), "task" (a tasks.py task or 'gsm8k'),
# "answer" (the reference answer, for GSM8K its final number) and "ids" (the rendered prompt).

THINK = re.compile(r"\s*<think>((?:(?!</?think>).)*)</think>(.*)", re.DOTALL)


def answer_part(completion):
    """What follows the reasoning: the text after the last </think>, or all of it when there is none."""
    return completion.rpartition("</think>")[2]


def reward_correct(prompt, completion):
    """1.0 iff the answer is right: the task's exact checker (tasks.check), for GSM8K the value of the answer's last
    number equal to the reference's final number (tasks.check_gsm8k: '$18.00' is 18; ASCII digits only, so a word or
    '４２' is wrong)."""
    text = answer_part(completion)
    if prompt["task"] == "gsm8k":
        return float(tasks.check_gsm8k(text, prompt["answer"]))
    return float(tasks.check(prompt["task"], text, prompt["answer"]))


def reward_partial(prompt, completion):
    """reward_correct with partial credit for a sequence (tasks.partial_credit: sort's fraction of numbers in
    place); for GSM8K and single-number answers it is reward_correct."""
    if prompt["task"] == "gsm8k":
        return reward_correct(prompt, completion)
    return tasks.partial_credit(prompt["task"], answer_part(completion), prompt["answer"])


def reward_format(prompt, completion):
    """R1-Zero's format reward: 1.0 iff the completion is its reasoning inside one <think>...</think>, then an
    answer (non-empty, no further think tags)."""
    m = THINK.fullmatch(completion)
    return float(bool(m) and bool(m.group(1).strip()) and bool(m.group(2).strip())
                 and "<think>" not in m.group(2) and "</think>" not in m.group(2))


REWARDS = {"correct": reward_correct, "partial": reward_partial, "format": reward_format}


def parse_rewards(spec):
    """'correct,format:0.5' -> [(name, function, weight)]; a one-line UserError for an unknown name or weight."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        name, _, weight = item.partition(":")
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r} in rewards={spec!r}: choose from {', '.join(REWARDS)} "
                            "(name or name:weight, comma-separated)")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"reward weight {weight!r} of {name!r} is not a number (rewards={spec!r})") from None
        out.append((name, REWARDS[name], w))
    return out


def score(prompt, completion, ended, reward_fns):
    """(total reward, each function's reward): a completion that never ended gets 0 from every function."""
    each = [float(fn(prompt, completion)) if ended else 0.0 for _, fn, _ in reward_fns]
    return sum(w * r for (_, _, w), r in zip(reward_fns, each)), each


# ---- prompts ----------------------------------------------------------------------------------------------------

def parse_prompts(spec):
    """'compare,min,sort:3' -> [(source, weight)]: a tasks.py task or 'gsm8k', and how many times its prompts enter
    the pool (an integer >= 1; sort:3 is drawn three times as often as a source of weight 1 with as many prompts)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        source, _, weight = item.partition(":")
        if source != "gsm8k" and source not in tasks.TASKS:
            raise UserError(f"unknown prompt source {source!r} in prompts={spec!r}: use tasks.py's tasks "
                            f"({', '.join(tasks.TASKS)}) or 'gsm8k' (name or name:weight, comma-separated)")
        if weight and not (weight.isdigit() and int(weight) >= 1):
            raise UserError(f"prompt weight {weight!r} of {source!r} must be an integer >= 1 (prompts={spec!r})")
        out.append((source, int(weight or 1)))
    return out


def load_prompts(sources, n_per_task, seed, enc, max_prompt_len):
    """The training prompt pool: tasks.py's training problems and/or GSM8K's train split, rendered in the chat
    format, each source `weight` times (parse_prompts); prompts longer than max_prompt_len tokens are dropped.
    Returns (pool, number dropped)."""
    pool = []
    for source, weight in parse_prompts(sources):
        if source == "gsm8k":
            reason = hub_offline_reason()  # said here: hub_conversations' own message names train.py's settings
            if reason:
                raise UserError(f"could not reach the Hugging Face Hub for GSM8K ({reason}); offline, use tasks.py's "
                                "prompts (e.g. prompts='compare')")
            some = [{"messages": conv[:1], "task": "gsm8k", "answer": tasks.last_number(conv[1]["content"])}
                    for conv in hub_conversations("gsm8k", "train")]
        else:
            some = [{"messages": [{"role": "user", "content": q}], "task": source, "answer": a}
                    for q, a, _ in tasks.problems(source, "train", n_per_task, seed)]
        pool += some * weight
    for p in pool:
        p["ids"] = render_prompt(p["messages"], enc)
    kept = [p for p in pool if len(p["ids"]) <= max_prompt_len]
    if not kept:
        raise UserError(f"no prompt of {sources!r} fits the model's context with max_new_tokens: lower max_new_tokens")
    return kept, len(pool) - len(kept)


# ---- the algorithm ----------------------------------------------------------------------------------------------

def group_advantages(rewards, std_normalize=True, eps=ADV_EPS):
    """rewards (G,) of one prompt's group -> advantages (G,): (r - mean) / (std + eps), or r - mean. All equal: 0."""
    if bool((rewards == rewards[0]).all()):
        return torch.zeros_like(rewards)  # exactly (the float mean of 8 x 0.3 is not 0.3: r - mean would be ~1e-8)
    centred = rewards - rewards.mean()
    return centred / (rewards.std(correction=0) + eps) if std_normalize else centred


K3_MAX = 10.0


def k3(logp, ref_logp, max_value=K3_MAX):
    """The unbiased, always >= 0 estimator of KL(pi || pi_ref) from a token sampled from pi (Schulman's k3, used by
    DeepSeekMath eq. 4): pi_ref/pi - log(pi_ref/pi) - 1. Its expectation under pi is the exact KL. Capped at
    max_value (as verl's low_var_kl): where pi has fallen below ~7% of pi_ref on a sampled token, exp(d) and its
    gradient explode (one such token gave a gradient norm of 2.7e6 at lr 1e-3, docs/results.md), and the cap
    stops that token's gradient instead; None: uncapped."""
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    return kl if max_value is None else kl.clamp(max=max_value)


def completion_lengths(tokens, eos=EOS):
    """tokens (B, L) of completions (rows padded after their EOS) -> (lengths (B,): up to and including the first
    EOS, L if none; ended (B,) bool)."""
    is_eos = tokens == eos
    ended = is_eos.any(dim=1)
    first = is_eos.int().argmax(dim=1)
    return torch.where(ended, first + 1, torch.full_like(first, tokens.size(1))), ended


def completion_mask(lengths, L):
    """(B, L) float: 1 on the first lengths[i] tokens of completion i (its text and EOS), 0 on the padding."""
    return (torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]).float()


class TokenLogprob(torch.autograd.Function):
    """log softmax(z)[target] over the last dim: logits z (..., V), target (...) -> (...), with one exp pass over
    the vocabulary for the forward, the backward and the entropy together: the softmax p that the forward makes is
    kept, the backward is (onehot - p) * g, and the entropy logsumexp(z) - sum p z needs no exp. The plain
    log_softmax + gather takes three (forward, backward, entropy), and on a CPU an exp over 50,257 entries per
    position is most of the cost of the vocabulary. With entropy=True also returns the entropy (no gradient)."""

    @staticmethod
    def forward(ctx, logits, target, entropy=False):
        m = logits.amax(-1, keepdim=True)
        p = (logits - m).exp_()
        s = p.sum(-1, keepdim=True)
        lse = (m + s.log()).squeeze(-1)
        p.div_(s)
        ctx.save_for_backward(p, target)
        logp = logits.gather(-1, target[..., None]).squeeze(-1) - lse
        ent = lse - (p * logits).sum(-1) if entropy else torch.empty(0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _):
        p, target = ctx.saved_tensors
        return (p * -g[..., None]).scatter_add_(-1, target[..., None], g[..., None]), None, None


def completion_logprobs(model, ids, n_prompt, n_vocab=EOS + 1, temperature=1.0, entropy=False):
    """Log-probs (B, L) of the completion tokens ids[:, n_prompt:] under the model's main head (a full forward over
    prompt + completion; no MTP), of the distribution they were sampled from: the first n_vocab ids at temperature.
    With entropy=True also that distribution's entropy at each completion position (B, L), without gradient."""
    h, _ = model.trunk(ids[:, :-1])                      # position t predicts token t + 1: the main head
    x = model.norm(h[:, n_prompt - 1:])                  # (Transformer.forward's), on the completion positions only
    logits = F.linear(x, model.head.weight[:n_vocab]).float()  # the head's first n_vocab rows: no slice of the logits
    if temperature != 1.0:
        logits = logits / temperature
    logp, ent = TokenLogprob.apply(logits, ids[:, n_prompt:], entropy)
    return logp, ent if entropy else None


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, loss_norm, denom, dual_clip=0.0):
    """DeepSeekMath eq. 3, negated (a loss), for one group of completions:
        per token  -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3,   rho = exp(logp - old_logp)
    with dual_clip = c > 1 and A < 0, the first term is at most -c A (dual-clip PPO, Ye et al. 2020, verl's
    clip_ratio_c): PPO's min leaves rho A unbounded when a bad token's rho grows, and its gradient with it.
    summed over the completion tokens (mask) and divided by `denom`: the number of completion tokens of the whole
    step (loss_norm='token'), or, after a mean over each completion's tokens, its number of completions
    ('sequence'); over all groups and ranks, so the summed gradients are those of the step's mean.
    logp, old_logp, ref_logp (None when beta = 0), mask: (B, L); adv: (B,).
    Returns (loss, {"kl": sum of k3 over the tokens, "clipped": tokens whose gradient the clip stopped})."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if dual_clip:
        per_token = torch.where(a < 0, torch.minimum(per_token, -dual_clip * a), per_token)
    kl = torch.zeros_like(logp) if ref_logp is None else k3(logp, ref_logp)
    if beta:
        per_token = per_token + beta * kl
    if loss_norm == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    else:
        loss = (per_token * mask).sum() / denom
    with torch.no_grad():  # outside the trust region on the side the advantage pushes towards: no gradient
        clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
        if dual_clip:
            clipped |= (ratio > dual_clip) & (a < 0)
        stats = {"kl": (kl.detach() * mask).sum(), "clipped": (clipped * mask).sum()}
    return loss, stats


def inverse_cdf(probs, u, block=1024):
    """Token ids (R,) drawn from probs (R, V) (any non-negative masses) with one uniform u (R, 1) per row: the first
    id whose cumulative mass exceeds u times the row's total. In two levels, the block of `block` ids and then the id
    in it, so that float64 sums run over the block masses and one block per row, not over all V ids (a float64
    cumsum over 50,257 ids of 1,024 rows was twice the model's own time per decoded token on a CPU)."""
    R, V = probs.shape
    full = V // block * block
    mass = probs[:, :full].view(R, -1, block).sum(-1, dtype=torch.float64)
    if full < V:
        mass = torch.cat([mass, probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    cum = mass.cumsum(-1)
    target = u.double() * cum[:, -1:]
    b = torch.searchsorted(cum, target, right=True).clamp(max=cum.size(1) - 1)  # (R, 1): the block
    target = target - torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    idx = b * block + torch.arange(block, device=probs.device)
    inside = torch.where(idx < V, probs.gather(1, idx.clamp(max=V - 1)), 0).double().cumsum(-1)
    j = torch.searchsorted(inside, target, right=True).clamp(max=block - 1)
    return (b * block + j).clamp(max=V - 1).squeeze(1)


@torch.no_grad()
def rollout(model, prompts, group_size, max_new_tokens, temperature=1.0, top_k=None, generators=None,
            n_vocab=EOS + 1):
    """G = group_size completions of each of P prompts of one length, sampled together through the latent cache: one
    prefill of the P x G rows (same length: no padding), then one decode step per token for all rows. Prompt i's G
    rows draw from generators[i] alone, so its completions do not depend on which prompts share its batch (or rank).
    A row that has emitted EOS is still fed (its later tokens are set to EOS and ignored); decoding stops when every
    row has ended or after max_new_tokens. Returns tokens (P * G, L), prompt i's rows at i * G, L <= max_new_tokens,
    EOS-padded after each row's end. One batch for all P prompts, not a loop over them."""
    device = model.head.weight.device
    P, T = len(prompts), len(prompts[0])
    assert all(len(p) == T for p in prompts), "rollout() batches prompts of one length"
    generators = generators or [None] * P
    rows = P * group_size
    cache = model.init_cache(rows, device, torch.float32 if device.type == "cpu" else None)
    ids = torch.tensor(prompts, device=device).repeat_interleave(group_size, dim=0)
    h, _ = model.trunk(ids, cache, 0)  # the prefill; the head on the last position only, the one sampled from
    logits = model.head(model.norm(h[:, -1:]))
    out = torch.full((rows, max_new_tokens), EOS, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        # inverse-CDF sampling: one uniform per row from its prompt's generator (torch.multinomial draws one random
        # number per vocabulary entry: 51M a step for 1,024 rows, most of a CPU rollout's time)
        u = torch.cat([torch.rand(group_size, 1, device=device, generator=g) for g in generators])
        tok = inverse_cdf(sample_probs(logits[:, -1, :n_vocab], temperature, top_k), u)
        tok = torch.where(done, EOS, tok)
        out[:, t] = tok
        done |= tok == EOS
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits, _ = model.decode(tok[:, None], cache, T + t)
    return out[:, :t + 1]


# ---- the run: settings, setup ------------------------------------------------------------------------------------

def check_settings(c):
    """A one-line UserError for the first bad setting, before anything is loaded or written."""
    if c.group_size < 2:
        raise UserError(f"group_size must be >= 2 (advantages compare completions of the same prompt), got "
                        f"{c.group_size}")
    for name in ("prompts_per_step", "ppo_epochs", "max_new_tokens", "eval_interval", "log_interval"):
        if getattr(c, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("max_iters", "warmup_iters", "eval_n", "eval_samples", "eval_gsm8k", "top_k", "beta",
                 "learning_rate", "weight_decay", "grad_clip"):
        if getattr(c, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.temperature > 0:
        raise UserError(f"temperature must be > 0 (greedy completions would all be equal), got {c.temperature}")
    if not c.clip_eps > 0:
        raise UserError(f"clip_eps must be > 0, got {c.clip_eps}")
    if c.dual_clip and not c.dual_clip > 1:
        raise UserError(f"dual_clip must be > 1 (or 0: off), got {c.dual_clip}")
    if c.loss_norm not in ("token", "sequence"):
        raise UserError(f"loss_norm must be 'token' or 'sequence', not {c.loss_norm!r}")
    if c.dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype must be 'float32' or 'bfloat16' (float16 gradients underflow without a scaler), "
                        f"not {c.dtype!r}")
    parse_rewards(c.rewards)
    sources = [s for s, _ in parse_prompts(c.prompts)]
    if c.task_problems < 1 and any(s in tasks.TASKS for s in sources):
        raise UserError(f"task_problems must be >= 1 (training problems per task of prompts={c.prompts!r}), got "
                        f"{c.task_problems}")
    if c.lora_rank % 8 and c.lora_experts and c.device.startswith("cuda"):
        raise UserError(f"lora_experts on CUDA needs lora_rank a multiple of 8 (grouped_mm's alignment), got "
                        f"{c.lora_rank}")
    check_device(c.device)


def load_reference(path, device, expected=None):
    """The frozen reference model pi_ref from `path`; with `expected`, its fingerprint must match (a resume)."""
    ckpt = load_checkpoint(path)
    ref = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    load_weights(ref, ckpt, path)  # a LoRA SFT run's adapters come merged
    if expected is not None and fingerprint(ref) != expected:
        raise UserError(f"the reference model {path} is not the one this run started from (its weights changed): "
                        "restore it, or start a new run")
    return ref.to(device).eval().requires_grad_(False)


def log(r, *args):
    """Print on rank 0 only."""
    if r.master:
        print(*args, flush=True)


def all_sum(r, t):
    """t summed over the ranks (on the device: NCCL reduces CUDA tensors only), back on the CPU."""
    if not r.ddp:
        return t
    t = t.to(r.device)
    dist.all_reduce(t)
    return t.cpu()


def load_policy(r):
    """The policy r.model: init_from's model (a LoRA run's merged), or for a resume the run's own; with lora_rank its
    adapters, seeded or restored, on the frozen weights. Returns the checkpoint it was read from."""
    c = r.c
    if r.resuming and not os.path.isfile(r.ckpt_path):
        raise UserError(f"init_from='resume' but there is no checkpoint at {r.ckpt_path}")
    if not r.resuming and not os.path.isfile(os.path.join(c.init_from, "ckpt.pt")) and not os.path.isfile(c.init_from):
        raise UserError(f"init_from must be a chat-tuned out_dir holding a ckpt.pt (python train.py "
                        f"config/sft_tiny.py makes one) or 'resume', not {c.init_from!r}")
    base = load_checkpoint(r.ckpt_path if r.resuming else c.init_from)
    if r.resuming and "reference" not in base:
        raise UserError(f"{r.ckpt_path} is not a grpo.py checkpoint (no reference): use another out_dir")
    r.cfg = ModelConfig.from_dict(base["model_config"])
    if r.cfg.vocab_size <= ASSISTANT:
        raise UserError(f"the model's vocab_size {r.cfg.vocab_size} has no rows for the chat tokens (ids {BOS}-"
                        f"{ASSISTANT}): GRPO needs a chat-tuned model (python train.py config/sft_tiny.py)")
    model = Transformer(r.cfg)
    lora = base.get("lora") if r.resuming else None  # a LoRA GRPO run: its base's weights, then its adapters
    if bool(c.lora_rank) != bool(lora) and r.resuming:
        raise UserError(f"{r.ckpt_path} is {'a LoRA' if lora else 'a full'} run: resume it with "
                        f"{'lora_rank=' + str(lora['rank']) if lora else 'lora_rank=0'}")
    if lora:
        load_lora_base(model, lora, r.ckpt_path)
    else:
        load_weights(model, base, r.ckpt_path if r.resuming else c.init_from)  # a LoRA SFT run comes merged
    r.start_print = None if r.resuming else fingerprint(model)  # pi_ref's weights: the policy's before any adapter
    if c.lora_rank and not r.resuming:  # the base's identity: what its checkpoint stores (lora.checkpoint_hash)
        lora = dict(rank=c.lora_rank, alpha=c.lora_alpha, dropout=0.0, targets=c.lora_targets.split(","),
                    experts=c.lora_experts, token_rows=None, base=c.init_from, hash=checkpoint_hash(base))
    if lora:
        torch.manual_seed(c.seed)  # the adapters' initial A: the same for the same seed
        add_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"], lora["experts"])
        if r.resuming:
            load_adapters(model, base["model"], r.ckpt_path)
    model.to(r.device).eval()  # eval mode throughout: no dropout here, and the MoE's load counters stay untouched
    for name, p in model.named_parameters():  # frozen: the routers and the MTP modules (see the docstring)
        frozen = name.endswith("gate.weight") or name.startswith("mtp.") or (lora and "lora_" not in name)
        p.requires_grad_(not frozen)
    r.model, r.lora = model, lora
    r.params = [p for p in model.parameters() if p.requires_grad]
    return base


def restore_or_start(r, base):
    """The optimizer, the sampling RNG, the position (step, time, tokens) and the reference's path and fingerprint:
    the checkpoint's for a resume, else fresh."""
    c = r.c
    r.opt = build_optimizer(r.model, "adamw", c.learning_rate, c.weight_decay, (c.beta1, c.beta2))
    r.gen = torch.Generator().manual_seed(c.seed)  # the sampling RNG: the same on every rank (docstring)
    if not r.resuming:
        r.ref_path, r.ref_print = c.init_from, r.start_print
        r.step, r.elapsed, r.tokens_seen = 0, 0.0, 0
        r.chat_data = base.get("config", {}).get("chat_data", "")
        if not r.chat_data:
            log(r, f"grpo.py: note: {c.init_from} was not chat-tuned (no chat_data in its run): expect replies that "
                "never end (reward 0) and little to learn from; python train.py config/sft_tiny.py makes a chat model")
        return
    r.ref_path, r.ref_print = base["reference"]["path"], base["reference"]["fingerprint"]
    try:
        r.opt.load_state_dict(base["optimizer"])
    except (ValueError, KeyError):
        raise UserError(f"{r.ckpt_path}: its optimizer state does not fit this model's trainable parameters") from None
    r.gen.set_state(base["rng"]["sampling"])
    r.step, r.elapsed, r.tokens_seen = base["step"], base["time"], base["tokens"]
    r.chat_data = base["config"].get("chat_data", "")


def drop_records_after(out_dir, step):
    """A resume: the steps logged after the checkpoint (a crash) will run again, so their records go."""
    for name in ("log.jsonl", "eval.jsonl"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            atomic_write(path, lambda f: f.writelines(keep), mode="w")


def first_eval_record(out_dir):
    """A resumed run's first held-out eval (eval.jsonl's first record), for the final summary; None if none."""
    path = os.path.join(out_dir, "eval.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        first = json.loads(f.readline() or "{}")
    return first if any(k.startswith("task_") for k in first) else None


def setup(c):
    """Everything the run holds, in one namespace r that the other functions read: the processes and device (ddp,
    rank, world, master, device, ctx), the policy (model, lora, params, cfg), its optimizer, sampling RNG and
    position (opt, gen, step, elapsed, tokens_seen), the reference (ref, ref_path, ref_print), the prompt pool."""
    ddp, rank, _, world, device = init_distributed(c.device)
    r = SimpleNamespace(c=c, config=dict(vars(c)), ddp=ddp, rank=rank, world=world, device=device, master=rank == 0,
                        ctx=autocast_context("cuda" if device.startswith("cuda") else "cpu", c.dtype),
                        ckpt_path=os.path.join(c.out_dir, "ckpt.pt"), resuming=c.init_from == "resume")
    if c.prompts_per_step % world:
        raise UserError(f"prompts_per_step={c.prompts_per_step} is not a multiple of the {world} processes")
    r.reward_fns = parse_rewards(c.rewards)
    base = load_policy(r)
    restore_or_start(r, base)
    r.ref = load_reference(r.ref_path, device, r.ref_print if r.resuming else None) if c.beta > 0 else None
    base = None
    r.enc = get_tokenizer()
    r.pool, n_dropped = load_prompts(c.prompts, c.task_problems, c.seed, r.enc, r.cfg.max_seq_len - c.max_new_tokens)
    r.start_step = r.step
    os.makedirs(c.out_dir, exist_ok=True)
    if r.resuming and r.master:
        drop_records_after(c.out_dir, r.step)
    n_train = sum(p.numel() for p in r.params)
    log(r, f"grpo.py: {'resumed ' + r.ckpt_path + ' at step ' + str(r.step) if r.resuming else 'from ' + c.init_from}; "
        f"reference {r.ref_path if r.ref is not None else '(none: beta = 0)'}; {len(r.pool):,} prompts ({c.prompts}"
        + (f", {n_dropped} too long dropped" if n_dropped else "") + f"), {c.prompts_per_step} x {c.group_size} "
        f"completions per step on {world} process(es); {n_train / 1e6:.2f}M trainable parameters (routers and MTP "
        f"frozen); rewards {', '.join(f'{n} x {w:g}' for n, _, w in r.reward_fns)}")
    r.log_file = open(os.path.join(c.out_dir, "log.jsonl"), "a") if r.master else None
    r.first_eval = first_eval_record(c.out_dir) if r.resuming and r.master else None
    r.last_eval, r.prior_rules, r.history = None, {}, []
    return r


# ---- one step: 1-3 rollouts, rewards, advantages; 4 update -------------------------------------------------------

def rollouts_and_rewards(r):
    """Steps 1-3 on this rank's prompts of the step: G completions of each (rollout), their rewards (score), their
    advantages (group_advantages). Returns the groups, what update() needs of each, and this rank's sums of the
    step's statistics."""
    c = r.c
    picks = torch.randint(len(r.pool), (c.prompts_per_step,), generator=r.gen).tolist()
    seeds = torch.randint(2 ** 62, (c.prompts_per_step,), generator=r.gen).tolist()
    groups = []
    tot = dict.fromkeys(["reward", *(f"reward_{n}" for n, _, _ in r.reward_fns), "sequences", "tokens", "ended",
                         "kl", "clipped", "entropy", "same_reward_groups"], 0.0)
    by_task = {t: [0.0, 0.0] for t, _ in parse_prompts(c.prompts)}  # per prompt source: reward sum, completions
    mine = list(range(r.rank, c.prompts_per_step, r.world))
    by_length = {}  # this rank's prompts, batched by length for the rollouts; the groups keep the step's order
    for i in mine:
        by_length.setdefault(len(r.pool[picks[i]]["ids"]), []).append(i)
    completions = {}
    for batch in by_length.values():
        gens = [torch.Generator(device=r.device).manual_seed(seeds[i]) for i in batch]
        with r.ctx:  # 1. rollouts
            toks = rollout(r.model, [r.pool[picks[i]]["ids"] for i in batch], c.group_size, c.max_new_tokens,
                           c.temperature, c.top_k or None, gens)
        completions.update(zip(batch, toks.split(c.group_size)))
    for i in mine:
        prompt, toks = r.pool[picks[i]], completions[i]
        lengths, ended = completion_lengths(toks)
        toks = toks[:, :int(lengths.max())]  # a batch decodes to its longest row: trim to this group's
        scored = [score(prompt, r.enc.decode([t for t in row[:n].tolist() if t < BOS]), e, r.reward_fns)  # 2. rewards
                  for row, n, e in zip(toks, lengths.tolist(), ended.tolist())]
        rewards = torch.tensor([s for s, _ in scored], dtype=torch.float32)
        adv = group_advantages(rewards, c.std_normalize)  # 3. advantages
        ids = torch.cat([torch.tensor(prompt["ids"], device=r.device).expand(c.group_size, -1), toks], dim=1)
        groups.append(SimpleNamespace(ids=ids, n_prompt=len(prompt["ids"]), adv=adv.to(r.device),
                                      mask=completion_mask(lengths, toks.size(1)).to(r.device)))
        tot["reward"] += rewards.sum().item()
        by_task[prompt["task"]][0] += rewards.sum().item()
        by_task[prompt["task"]][1] += c.group_size
        for (name, _, _), rs in zip(r.reward_fns, zip(*(each for _, each in scored))):
            tot[f"reward_{name}"] += sum(rs)
        tot["sequences"] += c.group_size
        tot["tokens"] += lengths.sum().item()
        tot["ended"] += ended.sum().item()
        tot["same_reward_groups"] += float(bool((rewards == rewards[0]).all()))
    for t, (s, n) in by_task.items():  # fixed keys, the same on every rank (all_sum adds them up)
        tot[f"task_sum_{t}"], tot[f"task_n_{t}"] = s, n
    return groups, tot


def update(r, groups, denom, tot):
    """Step 4: the pi_ref log-probs of the groups, then ppo_epochs optimizer steps, each over every group's
    grpo_loss (normalised by `denom`, the step's tokens or sequences over all ranks). Adds the KL and entropy of the
    sampling policy and the clipped tokens to tot; returns the last gradient norm."""
    c = r.c
    with torch.no_grad(), r.ctx:
        for g in groups:
            g.ref = completion_logprobs(r.ref, g.ids, g.n_prompt, temperature=c.temperature)[0] \
                if r.ref is not None else None
    for epoch in range(c.ppo_epochs):
        for g in groups:
            with r.ctx:
                logp, ent = completion_logprobs(r.model, g.ids, g.n_prompt, temperature=c.temperature,
                                                entropy=epoch == 0)
            if epoch == 0:  # no step yet: this forward is pi_old (the sampling policy), kept for the later epochs
                g.old = logp.detach()
            loss, st = grpo_loss(logp, g.old, g.ref, g.adv, g.mask, c.clip_eps, c.beta, c.loss_norm, denom,
                                 c.dual_clip)
            loss.backward()
            tot["clipped"] += st["clipped"].item() / c.ppo_epochs
            if epoch == 0:  # the sampling policy's KL and entropy
                tot["kl"] += st["kl"].item()
                tot["entropy"] += (ent * g.mask).sum().item()
        grad_norm = optimizer_step(r)
    return grad_norm


def optimizer_step(r):
    """Sum the gradients over the ranks (the loss is normalised over the whole step: the sum is the gradient), clip
    them, step. Returns the gradient norm; a non-finite one stops the run before it writes a checkpoint."""
    for p in r.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if r.ddp:
            dist.all_reduce(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.params, r.c.grad_clip if r.c.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        raise UserError(f"non-finite gradient at step {r.step}; stopping without writing a checkpoint "
                        f"(last good checkpoint: {r.ckpt_path}); try a lower learning_rate")
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    return grad_norm


def grpo_step(r):
    """One GRPO step over all ranks: rollouts, rewards and advantages, then the update. Returns its log record: per
    completion the rewards, length (EOS included) and ended; per completion token the KL, clip and entropy."""
    c, t0 = r.c, time.time()
    lr = c.learning_rate * min(1.0, (r.step + 1) / (c.warmup_iters + 1))
    for group in r.opt.param_groups:
        group["lr"] = lr
    groups, tot = rollouts_and_rewards(r)
    n_seq, n_tok = all_sum(r, torch.tensor([tot["sequences"], tot["tokens"]], dtype=torch.float64)).tolist()
    t_roll = time.time() - t0
    grad_norm = update(r, groups, n_tok if c.loss_norm == "token" else n_seq, tot)
    tot = dict(zip(tot, all_sum(r, torch.tensor(list(tot.values()), dtype=torch.float64)).tolist()))
    r.step += 1
    dt = time.time() - t0
    r.elapsed += dt
    r.tokens_seen += int(n_tok)
    rec = {"step": r.step, "tokens": r.tokens_seen, "time": r.elapsed,
           **{k: tot[k] / n_seq for k in tot if k.startswith("reward")}, "len": n_tok / n_seq,
           "reward_by_task": {k[9:]: tot[k] / tot["task_n_" + k[9:]] for k in tot
                              if k.startswith("task_sum_") and tot["task_n_" + k[9:]]},
           "ended": tot["ended"] / n_seq, "kl": tot["kl"] / n_tok if r.ref is not None else None,
           "clip_frac": tot["clipped"] / n_tok, "entropy": tot["entropy"] / n_tok,
           "same_reward_groups": tot["same_reward_groups"] / c.prompts_per_step, "lr": lr,
           "grad_norm": grad_norm.item(), "tok_per_s": n_tok / dt, "rollout_s": t_roll, "step_s": dt}
    r.history.append(rec["reward"])
    return rec


def log_step(r, rec):
    """log.jsonl (rank 0) and, every log_interval steps, a line."""
    c = r.c
    if r.master:
        r.log_file.write(json.dumps(rec) + "\n")
        r.log_file.flush()
    if r.step % c.log_interval == 0 or r.step == c.max_iters:
        each = " ".join(f"{name} {rec['reward_' + name]:.3f}" for name, _, _ in r.reward_fns)
        if len(rec["reward_by_task"]) > 1:
            each += " | " + " ".join(f"{t} {v:.2f}" for t, v in rec["reward_by_task"].items())
        log(r, f"step {r.step}/{c.max_iters} | reward {rec['reward']:.3f} ({each}) | len {rec['len']:.1f} "
            f"ended {rec['ended']:.0%} | kl " + (f"{rec['kl']:.4f}" if rec["kl"] is not None else "-")
            + f" | clip {rec['clip_frac']:.3f} | ent {rec['entropy']:.3f} | all-equal groups "
            f"{rec['same_reward_groups']:.0%} | grad {rec['grad_norm']:.3f} | {rec['tok_per_s']:,.0f} tok/s "
            f"({rec['rollout_s']:.1f} s sampling, {rec['step_s'] - rec['rollout_s']:.1f} s update)")


# ---- evaluation, checkpoint, summary ------------------------------------------------------------------------------

def evaluate(r):
    """Rank 0: held-out tasks (chat.evaluate: greedy exact match, sampled pass@1 over eval_samples replies at the
    policy's temperature, the best answer-prior rule) and GSM8K (greedy); logged, and appended to eval.jsonl as
    task_<t> (greedy), task_<t>_pass1, task_<t>_prior."""
    import chat
    c, res = r.c, {}
    with r.ctx:
        if c.eval_n:
            res = chat.evaluate(r.model, r.enc, c.eval_n, c.seed, samples=c.eval_samples, temperature=c.temperature)
        if c.eval_gsm8k:
            res["gsm8k"] = chat.evaluate_gsm8k(r.model, r.enc, c.eval_gsm8k)
    log(r, f"step {r.step}: held-out, {c.eval_n} problems per task" + (f", {c.eval_gsm8k} of GSM8K" if c.eval_gsm8k
        else "") + (f"; sampled pass@1 over {c.eval_samples} replies at temperature {c.temperature:g}"
                    if c.eval_samples and c.eval_n else "") + "\n" + tasks.format_results(res))
    rec = {"step": r.step, "tokens": r.tokens_seen, "time": r.elapsed,
           **{f"task_{t}{k}": s[v] for t, s in res.items()
              for k, v in (("", "accuracy"), ("_pass1", "pass1"), ("_prior", "prior")) if v in s}}
    with open(os.path.join(c.out_dir, "eval.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    r.first_eval, r.last_eval = r.first_eval or rec, rec
    r.prior_rules.update({t: s["prior_rule"] for t, s in res.items() if "prior_rule" in s})


def write_checkpoint(r):
    """Rank 0 writes; first the ranks must agree on every weight (they applied the same updates)."""
    if r.ddp:
        prints = [None] * r.world
        dist.all_gather_object(prints, fingerprint(r.model))
        if any(p != prints[0] for p in prints):
            raise UserError(f"DDP ranks disagree on the weights at step {r.step}")
    if r.master:
        save_checkpoint(r.ckpt_path, {
            "model": adapter_state(r.model) if r.lora else r.model.state_dict(), "model_config": asdict(r.cfg),
            "optimizer": r.opt.state_dict(), **({"lora": r.lora} if r.lora else {}),
            # chat.py reads chat_data to know a checkpoint is chat-tuned: a GRPO policy is, as its SFT base was
            "config": {**r.config, "chat_data": r.chat_data}, "step": r.step, "time": r.elapsed,
            "tokens": r.tokens_seen, "rng": {"sampling": r.gen.get_state()},
            "reference": {"path": r.ref_path, "fingerprint": r.ref_print}})
    log(r, f"saved {r.ckpt_path} (step {r.step})")


def eval_summary(first, last, rules):
    """Per task of two eval.jsonl records: greedy first -> last, sampled pass@1 first -> last, the prior rule."""
    out = []
    for key in last:
        if not key.startswith("task_") or key.endswith(("_pass1", "_prior")) or first.get(key) is None:
            continue
        t = key[5:]
        line = f"{t} greedy {first[key]:.2f} -> {last[key]:.2f}"
        if first.get(f"{key}_pass1") is not None and last.get(f"{key}_pass1") is not None:
            line += f", sampled pass@1 {first[key + '_pass1']:.2f} -> {last[key + '_pass1']:.2f}"
        if last.get(f"{key}_prior") is not None:
            line += f", prior rule ({rules.get(t, '?')}) {last[key + '_prior']:.2f}"
        out.append(line)
    return "; ".join(out)


def finish(r):
    """The summary line: the mean reward over the first and last steps of this run, and the held-out evals."""
    if r.master:
        r.log_file.close()
    k = max(1, min(10, len(r.history) // 2))
    line = f"done: {r.step} steps, {r.elapsed:.0f} s of training"
    if len(r.history) >= 2:
        line += (f", mean reward {sum(r.history[:k]) / k:.3f} (first {k} steps of this run) -> "
                 f"{sum(r.history[-k:]) / k:.3f} (last {k})")
    if r.first_eval and r.last_eval:
        line += "; held-out " + eval_summary(r.first_eval, r.last_eval, r.prior_rules)
    log(r, line + f"; checkpoint {r.ckpt_path}")
    if r.ddp:
        dist.barrier()  # leave together (see train.py)


# ---- the loop -----------------------------------------------------------------------------------------------------

def run(c):
    """Set up, then a GRPO step at a time, evaluating and writing a checkpoint every eval_interval steps."""
    r = setup(c)
    while True:
        last_step = r.step == c.max_iters
        # evaluate and checkpoint; not at the step a resumed run starts from: that was done before it stopped
        if (r.step % c.eval_interval == 0 or last_step) and not (r.resuming and r.step == r.start_step):
            if (c.eval_n or c.eval_gsm8k) and r.master:
                evaluate(r)
            if r.step > r.start_step:
                write_checkpoint(r)
        if last_step:
            break
        log_step(r, grpo_step(r))
    finish(r)


def main(argv=None):
    c = SimpleNamespace(**configure(_SETTINGS, sys.argv[1:] if argv is None else argv,
                                    description=__doc__.strip().split("\n\n")[0]))
    try:
        check_settings(c)
        run(c)
    except UserError as e:
        sys.exit(f"grpo.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
