"""
Sample from a trained nanoDeepSeek checkpoint, nanoGPT style:

    python sample.py --out_dir=out-fineweb --start="The mitochondria is" --num_samples=3
    python sample.py --start=FILE:prompt.txt --temperature=0 --speculative=True --stats=True

Decoding runs the absorbed MLA path (model.decode): the prompt in one prefill pass, then one token per step
against a cache of kv_lora_rank + qk_rope_head_dim numbers per token and layer (the normed KV latent and the
shared RoPE key) instead of the n_heads * (qk_head_dim + v_head_dim) of multi-head attention.

--speculative=True is self-speculative decoding with the D = n_mtp MTP modules as the draft model. With the
sequence x_0..x_n, where x_n is sampled but not yet decoded, and h_i the main model's last hidden state:
  draft    MTP module 0 reads (h_{n-1}, x_n) and proposes d_1 = x_{n+1}; module k reads (its input hidden from
           module k-1, d_k) and proposes d_{k+1}. Each module keeps its own latent cache, fed with the hidden
           states of the accepted positions (positions computed from drafts are recomputed next round);
  verify   the main model decodes [x_n, d_1..d_D] at positions n..n+D in ONE call; drafts are accepted left to
           right by the speculative sampling rule (`accept_or_resample`); the main model's distribution at the
           first rejection (or after the last draft) gives one more token, so a round yields 1..D+1 tokens;
  rollback none needed: the next round decodes from the right start_pos and stale cache entries are ignored.
Greedy output (--temperature=0) is token-for-token the plain greedy output; sampled output has the main
model's distribution.

Only the text (prompt, then the continuation as it is generated) goes to stdout, samples separated by a line
of dashes, so two runs compare with `diff`; settings, statistics and errors go to stderr.
"""
import codecs
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from checkpoint import load_model
from configurator import UserError, configure, config_keys, one_line_errors
from data.loader import check_token_ids, get_tokenizer
from model import autocast_context, check_device

# -----------------------------------------------------------------------------------------------------------------
out_dir = 'out-fineweb'          # a directory holding ckpt.pt, or a checkpoint file
start = "\n"                     # the prompt, or FILE:path to read it from a file; "" starts a fresh document
num_samples = 3
max_new_tokens = -1              # -1: 200, or fewer if the prompt leaves less room in the model's max_seq_len
temperature = 0.8                # 0: greedy
top_k = 200                      # 0: off
top_p = 1.0                      # nucleus sampling below 1.0
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'   # float32 | bfloat16 | float16 (autocast)
compile = False                  # torch.compile the decode steps
speculative = False              # draft with the MTP modules, verify with the main model
stats = False                    # report cache bytes per token and prefill / decode speed (stderr)
stop_at_eot = True               # end a sample at <|endoftext|>
# -----------------------------------------------------------------------------------------------------------------


def sample_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The sampling distribution (B, V) of logits (B, V): one-hot on the argmax when temperature == 0 (greedy),
    else the softmax after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):  # None or 0: off
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def accept_or_resample(p, q, draft, generator=None):
    """The speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023), vectorised over rows.
    p, q (N, V): target (main model) and draft distributions; draft (N,): tokens drawn from q. Keeps a draft x
    with probability min(1, p(x)/q(x)), else draws from normalize(max(0, p - q)); either way the token is
    distributed as p. For one-hot p and q (greedy) this is "keep the draft iff it is the argmax".
    Returns (accepted (N,) bool, token (N,): the draft where accepted, the resampled token elsewhere)."""
    px, qx = p.gather(-1, draft[:, None]).squeeze(-1), q.gather(-1, draft[:, None]).squeeze(-1)
    accepted = torch.rand(px.shape, generator=generator, device=p.device) * qx < px   # u < p(x)/q(x)
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: always accepted anyway
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return accepted, torch.where(accepted, draft, resampled)


def check_request(cfg, prompt_len, max_new_tokens, speculative):
    """ValueError with a one-line message for a request the model cannot serve."""
    if prompt_len == 0:
        raise UserError("empty prompt: give at least one token (e.g. <|endoftext|> to start a document)")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}: shorten the prompt or generate fewer tokens")
    if speculative and cfg.n_mtp == 0:
        raise UserError("--speculative drafts with the MTP modules, but this model has none (n_mtp=0)")


def generate_tokens(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                    speculative=False, eot=None, n_vocab=None, stats=None, state=None):
    """Continue one sequence: returns an iterator over up to max_new_tokens new token ids (ints), which stops
    after yielding `eot`. The checks run now, so a bad request raises ValueError before anything is generated.
    n_vocab: sample among the first n_vocab ids only (the tokenizer's; the padded rows of the head are
    untrained and cannot be decoded). `stats` (a dict) receives prefill_tokens, prefill_s, decode_tokens,
    decode_s and, when speculative, drafted / accepted. `state` (a dict, empty at first) keeps the latent cache
    between calls: a later prompt that starts with the earlier prompt + its output (a chat's next turn) decodes
    only what is new. Model weights, expert biases and counters are untouched."""
    check_request(model.cfg, len(prompt_ids), max_new_tokens, speculative)
    stats = {} if stats is None else stats
    stats.update(prefill_tokens=len(prompt_ids), prefill_s=0.0, decode_tokens=0, decode_s=0.0, drafted=0, accepted=0)
    V = n_vocab or model.cfg.vocab_size

    def dist(logits):  # (N, vocab) -> the sampling distribution (N, V)
        return sample_probs(logits[..., :V], temperature, top_k, top_p)

    def draw(probs):  # (1, V) -> int
        return (probs.argmax(-1) if temperature == 0 else torch.multinomial(probs, 1, generator=generator)).item()

    D = model.cfg.n_mtp if speculative else 0
    steps = _steps(model, prompt_ids, max_new_tokens, D, dist, draw, generator, stats, {} if state is None else state)
    return _timed(model, steps, max_new_tokens, eot, stats)


@torch.inference_mode()
def _timed(model, steps, max_new_tokens, eot, stats):
    """Yield the tokens of `steps` (an iterator of token lists, the first one from the prefill) one by one,
    timing only the model's work (not the caller's between tokens), in eval mode, without autograd."""
    was_training = model.training
    model.eval()
    n = 0
    try:
        while n < max_new_tokens:
            t0 = time.perf_counter()
            chunk = next(steps)  # python ints: the device has synchronised
            stats['prefill_s' if n == 0 else 'decode_s'] += time.perf_counter() - t0
            for tok in chunk:
                n += 1
                stats['decode_tokens'] = n - 1
                yield tok
                if tok == eot:
                    return
    finally:
        steps.close()
        model.train(was_training)


def _steps(model, prompt_ids, max_new_tokens, D, dist, draw, generator, stats, state):
    """Cached decoding: yields the prefill's token, then per round 1 token (D = 0: plain decoding, one main-model
    forward per token) or 1..D+1 tokens (self-speculative decoding with D MTP drafts, module docstring).
    state holds the caches of an earlier call: the prefill starts after the longest prefix they hold exactly."""
    cfg, device = model.cfg, model.head.weight.device
    T = len(prompt_ids)
    if not state:
        # hs[k][:, i]: the hidden input of MTP module k at position i (hs[0] = main model's last hidden state);
        # done[k]: module k's cache holds exact entries (no draft among its inputs) for positions < done[k].
        state.update(cache=model.init_cache(1, device, torch.float32 if device.type == "cpu" else None), ids=[],
                     hs=[torch.zeros(1, cfg.max_seq_len, cfg.dim, device=device) for _ in range(cfg.n_mtp + 1)],
                     done=[0] * cfg.n_mtp)
    cache, hs, done = state["cache"], state["hs"], state["done"]
    start = 0  # positions < start hold this prompt's tokens already; at least the last one is decoded anew
    while start < min(len(state["ids"]), T - 1) and state["ids"][start] == prompt_ids[start]:
        start += 1
    done[:] = [min(d, max(start - k - 1, 0)) for k, d in enumerate(done)]  # module k at i reads token i + k + 1
    logits, h = model.decode(torch.tensor([prompt_ids[start:]], device=device), cache, start)
    hs[0][:, start:T] = h
    seq = list(prompt_ids) + [draw(dist(logits[:, -1]))]
    state["ids"] = seq[:-1]  # the caches hold exactly these positions
    yield seq[-1:]
    while True:
        # Invariant: seq = x_0..x_n; the main cache and hs[0] hold positions < n; x_n is not decoded yet.
        n = len(seq) - 1
        n_draft = min(D, T + max_new_tokens - n - 2)  # never draft past the last token we may yield
        drafts, qs = [], []
        for k in range(n_draft):
            # Module k at positions a..n-1 reads hs[k] there and the tokens x_{i+k+1} (drafts past x_n).
            a = done[k]
            toks = torch.tensor([(seq + drafts)[a + k + 1:]], device=device)
            logits_k, h_k = model.mtp_decode(k, hs[k][:, a:n], toks, cache, a)
            hs[k + 1][:, a:n] = h_k
            done[k] = n - k  # positions >= n - k read a draft token (or a hidden state computed from one)
            qs.append(dist(logits_k[:, -1]))
            drafts.append(draw(qs[-1]))
        logits, h = model.decode(torch.tensor([seq[n:] + drafts], device=device), cache, n)  # verify
        p = dist(logits[0])  # (n_draft + 1, V)
        n_ok = 0
        if n_draft:
            accepted, tokens = accept_or_resample(p[:-1], torch.cat(qs), torch.tensor(drafts, device=device), generator)
            n_ok = int(accepted.long().cumprod(0).sum())
        # the first rejected draft's resampled token, or one more token from the main model after the last draft
        new = drafts[:n_ok] + [tokens[n_ok].item() if n_ok < n_draft else draw(p[-1:])]
        hs[0][:, n:n + n_ok + 1] = h[:, :n_ok + 1]
        stats['drafted'] += n_draft
        stats['accepted'] += n_ok
        seq += new
        state["ids"] = seq[:-1]
        yield new


# -----------------------------------------------------------------------------------------------------------------
# command line

def text_stream(enc):
    """text(token id) -> the text it completes (a character split across tokens is held back until whole);
    text() -> whatever is left at the end. The pieces join to enc.decode(tokens)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda tok=None: utf8.decode(b"" if tok is None else enc.decode_single_token_bytes(tok), final=tok is None)


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {start[5:]!r} ({e.strerror})")


@one_line_errors("sample.py")
def main(argv=None):
    c = SimpleNamespace(**configure(config_keys(globals()), argv, quiet=True,
                                    description="\n\n".join(__doc__.strip().split("\n\n")[:2])))
    log = partial(print, file=sys.stderr)
    ctx = autocast_context(check_device(c.device).type, c.dtype, c.compile)
    if c.temperature < 0 or c.max_new_tokens < -1 or c.num_samples < 1:
        raise UserError("need temperature >= 0, max_new_tokens >= 0 (or -1) and num_samples >= 1")
    # checked here, not where they are used: that is after the prompt went to stdout, and it raises from torch
    if c.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0: off), got {c.top_k}")
    if not 0 < c.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (1: off), got {c.top_p}")
    model, ckpt = load_model(c.out_dir, c.device)
    enc = get_tokenizer()
    prompt = read_prompt(c.start)
    # a model with a smaller vocabulary than the tokenizer's cannot embed every id (IndexError in the prefill)
    prompt_ids = check_token_ids(enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token],
                                 model.cfg.vocab_size, "the prompt")
    if c.max_new_tokens == -1:  # an explicit number is checked, never silently cut
        c.max_new_tokens = max(0, min(200, model.cfg.max_seq_len - len(prompt_ids)))
    check_request(model.cfg, len(prompt_ids), c.max_new_tokens, c.speculative)

    log(f"sample.py: {c.out_dir} (step {ckpt.get('step', '?')}), {c.device} {c.dtype}, prompt {len(prompt_ids)} "
        f"tokens, {'speculative with ' + str(model.cfg.n_mtp) + ' MTP draft(s)' if c.speculative else 'plain'} decoding")
    torch.manual_seed(c.seed)
    generator = torch.Generator(device=c.device).manual_seed(c.seed)
    if c.compile:
        model.decode = torch.compile(model.decode, dynamic=True)
        model.mtp_decode = torch.compile(model.mtp_decode, dynamic=True)

    eot, total = enc.eot_token if c.stop_at_eot else None, {}
    with ctx:
        for _ in range(c.num_samples):
            st = {}
            print(prompt, end="", flush=True)
            text = text_stream(enc)
            for tok in generate_tokens(model, prompt_ids, c.max_new_tokens, c.temperature, c.top_k, c.top_p,
                                       generator, c.speculative, eot, enc.n_vocab, st):
                if tok != eot:
                    print(text(tok), end="", flush=True)
            print(text() + "\n---------------", flush=True)
            total = {k: total.get(k, 0) + v for k, v in st.items()}

    if c.stats:
        nbytes = 4 if c.dtype == "float32" else 2
        mla, mha = model.cache_bytes_per_token(nbytes)
        log(f"KV cache per token ({c.dtype}): MLA latent {mla:,} B ({model.cfg.n_layers} layers x "
            f"({model.cfg.kv_lora_rank} + {model.cfg.qk_rope_head_dim}) x {nbytes} B) vs multi-head attention "
            f"{mha:,} B: {mha / mla:.1f}x smaller")
        log(f"prefill: {total['prefill_tokens']} tokens in {total['prefill_s']:.3f} s "
            f"({_rate(total['prefill_tokens'], total['prefill_s'])}); decode: {total['decode_tokens']} tokens in "
            f"{total['decode_s']:.3f} s ({_rate(total['decode_tokens'], total['decode_s'])})")
    if c.speculative:
        acc = total['accepted'] / total['drafted'] if total['drafted'] else 0.0
        log(f"speculative: accepted {total['accepted']}/{total['drafted']} drafts ({acc:.1%}), "
            f"decode {_rate(total['decode_tokens'], total['decode_s'])}")


def _rate(n, seconds):
    return f"{n / seconds:.1f} tok/s" if seconds > 0 else "n/a"


if __name__ == "__main__":
    main()
