"""What every script imports from data/: the GPT-2 tokenizer (bundled, offline), the check of token ids against a
model's vocabulary, the chat format (DeepSeek-V3's template, its special tokens in spare ids of the padded
vocabulary), the data error type, the atomic file writer, and ShardReader, which cuts the token shards made by
data/fineweb.py into training windows.

Shards: uint16 .npy files (np.save, so each file states its own dtype and length) with a meta.json that lists
them (file, split, tokens) and records the tokenizer, vocab size and eot id; <prefix>_val_000000.npy comes first.
ShardReader memory-maps the shards of one split and cuts them into windows of seq_len + 1 tokens at stride
seq_len (x = w[:-1], y = w[1:], so the x parts never overlap); a window never crosses a shard boundary, so up to
seq_len tokens at the end of each shard are unused.
"""
import base64
import binascii
import functools
import gzip
import json
import os
import secrets
import socket
import threading
import urllib.parse
from array import array
from pathlib import Path

import numpy as np

from configurator import UserError

HERE = Path(__file__).resolve().parent
TOKENIZER_FILE = HERE / "gpt2.tiktoken.gz"  # GPT-2's BPE ranks in tiktoken's format, gzipped (data/README.md)
EOT = 50256  # GPT-2's <|endoftext|>: the id after its 50,256 byte tokens and merges; it starts every document


# GPT-2's pre-tokenizer regex, in the form tiktoken uses for its "gpt2" encoding (same splits, faster)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
REGENERATE = ("restore it (git checkout -- data/gpt2.tiktoken.gz) or rebuild it from GPT-2's vocab.bpe and "
              "encoder.json (python data/make_bundle.py --gpt2_dir DIR)")


class DataError(UserError):
    """A problem with the data or its inputs; the message says what is wrong and what to do, in one line."""


def first_line(error):
    """The first line of an exception's message, so that errors we pass on stay one line long."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@functools.lru_cache(maxsize=None)
def get_tokenizer(path=TOKENIZER_FILE):
    """GPT-2's BPE as a tiktoken Encoding (vocab 50257, eot 50256), built from the bundled gpt2.tiktoken.gz: no
    network, no cache dir; the same ids as tiktoken.get_encoding("gpt2"). Loaded once per process.
    A DataError (one line) if tiktoken is missing or the file is missing or corrupt."""
    try:
        import tiktoken
    except ImportError as e:
        raise DataError("the tiktoken package is missing: pip install tiktoken") from e
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:  # one "base64(token bytes) rank" line per token
            ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in map(str.split, f)}
    except FileNotFoundError as e:
        raise DataError(f"the bundled GPT-2 tokenizer file {path} is missing: {REGENERATE}") from e
    except (OSError, EOFError, UnicodeDecodeError, ValueError, binascii.Error) as e:  # bad gzip, line or base64
        raise DataError(f"the bundled GPT-2 tokenizer file {path} is corrupt ({first_line(e)}): {REGENERATE}") from e
    if sorted(ranks.values()) != list(range(EOT)):
        raise DataError(f"the bundled GPT-2 tokenizer file {path} is corrupt (expected {EOT} distinct "
                        f"tokens with ranks 0..{EOT - 1}, got {len(ranks)}): {REGENERATE}")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def check_token_ids(ids, vocab_size, what="the text"):
    """ids unchanged if every id fits a model of vocab_size, else a one-line DataError: a model trained with a
    smaller vocabulary than the tokenizer's would index past its embedding (IndexError, or a device-side assert)."""
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise DataError(f"{what} encodes to token id {top}, but the model's vocab_size is {vocab_size}: it was "
                        f"trained with a smaller vocabulary than the GPT-2 tokenizer's {EOT + 1}; use "
                        "text the model can read or a model with vocab_size >= 50257")
    return ids


# ---- the chat format -------------------------------------------------------------------------------------------
# DeepSeek-V3's template: <BOS>{system}<User>{user}<Assistant>{reply}<EOS><User>... The four special tokens take
# spare ids of the padded vocabulary (GPT-2 uses 0..50256, the model has 50304 rows), so there is no embedding
# resize and plain text encodes exactly as before. The strings are DeepSeek-V3's own.
BOS, EOS, USER, ASSISTANT = 50257, 50258, 50259, 50260
CHAT_TOKENS = {"<｜begin▁of▁sentence｜>": BOS, "<｜end▁of▁sentence｜>": EOS, "<｜User｜>": USER,
               "<｜Assistant｜>": ASSISTANT}


def _check_turns(messages, last):
    """The roles must be: an optional system message, then user and assistant alternating from a user turn, ending
    with a `last` turn ('assistant' to train on, 'user' to prompt). A DataError names the first wrong message."""
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    for i, m in enumerate(turns):
        want = ("user", "assistant")[i % 2]
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            got = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise DataError(f"message {i + len(messages) - len(turns)}: expected a {want!r} turn with string "
                            f"content, got role {got!r} (an optional system message first, then user and "
                            "assistant turns alternating)")
    if not turns or turns[-1]["role"] != last:
        raise DataError(f"the conversation must end with a {last!r} turn")


def render_conversation(messages, enc=None):
    """A conversation {'role': 'system' | 'user' | 'assistant', 'content': str} list -> (ids, mask), two lists of
    equal length. mask is 1 where the model is trained: every assistant reply and the EOS that ends it (so the
    model learns to stop); 0 on BOS, the system prompt, the role tokens and the user's text."""
    _check_turns(messages, "assistant")
    enc = enc or get_tokenizer()
    ids, mask = [BOS], [0]
    for m in messages:
        text = enc.encode_ordinary(m["content"])
        if m["role"] == "system":
            ids, mask = ids + text, mask + [0] * len(text)
        elif m["role"] == "user":
            ids, mask = ids + [USER] + text, mask + [0] * (len(text) + 1)
        else:
            ids, mask = ids + [ASSISTANT] + text + [EOS], mask + [0] + [1] * (len(text) + 1)
    return ids, mask


def render_prompt(messages, enc=None):
    """The ids that ask for the next assistant reply: the conversation (ending with a user turn) + <Assistant>."""
    _check_turns(messages, "user")
    ids, _ = render_conversation(messages + [{"role": "assistant", "content": ""}], enc)
    return ids[:-1]  # drop the EOS of the empty reply


def bytes_to_unicode():
    """GPT-2's byte -> character table. Bytes that are printable and not a space stand for themselves (the
    ranges '!'..'~', '¡'..'¬', '®'..'ÿ'); every other byte, in increasing order, gets the next code point
    from 256 upwards. Returns {byte value: character}."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    return {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(hidden)}}


def write_json(path, obj):
    """obj as indented JSON (and a final newline), written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def atomic_write(path, write, mode="wb"):
    """Write a file through write(f) to a temp file beside it, flush it to disk, then rename it over path: a file
    with the final name is always whole, and a failed write leaves the previous file and no temp file. The temp
    name is unique to this call, so writers racing for the same path (e.g. DDP ranks) never clobber each other's
    temp file: the last rename wins and every reader sees one whole file. Every file the project writes (shards,
    meta.json, checkpoints, downloads, results) goes through here."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it look finished
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ShardReader:
    """Token windows from the uint16 .npy shards of one split.

    The split's windows (seq_len + 1 tokens at stride seq_len, never across a shard boundary) are numbered in
    file order. Each epoch visits them in one order: a permutation seeded with seed + epoch (shuffle=True) or
    file order (shuffle=False); rank r of world_size takes every world_size-th window of it, and the last
    n_windows % world_size windows of the order are dropped so that every rank gets the same number. When a
    rank's windows run out, the next epoch starts, within the same batch if need be.
    next_batch() -> x, y: int64 (batch_size, seq_len) CPU tensors, y = x shifted by one token.
    """

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=1337, vocab_size=None,
                 shuffle=True):
        data_dir = Path(data_dir)
        how = "run python data/fineweb.py (or --input FILES --out_dir DIR) to make it"
        if not (data_dir / "meta.json").is_file():
            raise DataError(f"no token shards in {data_dir} (meta.json missing): {how}")
        try:
            meta = json.loads((data_dir / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{data_dir / 'meta.json'} is not valid JSON ({e}): {how} again") from e
        if meta.get("dtype") != "uint16":
            raise DataError(f"{data_dir / 'meta.json'} says dtype {meta.get('dtype')!r}; this reader needs uint16")
        if not meta.get("complete"):
            raise DataError(f"the shards in {data_dir} are unfinished (meta.json: complete=false): "
                            "rerun the python data/fineweb.py command that made them to finish them")
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise DataError(f"the shards in {data_dir} use vocab_size {meta['vocab_size']} but the model's "
                            f"vocab_size is {vocab_size}: make the model's vocab_size at least {meta['vocab_size']}")
        entries = [s for s in meta["shards"] if s["split"] == split]
        if not entries:
            raise DataError(f"no {split!r} shards in {data_dir}/meta.json (too little data for a {split} shard?): "
                            f"{how} with more data or a smaller --shard_size")
        self.shards = []  # memory-mapped: opening reads only the .npy header, which is what we check here
        for s in entries:
            path = data_dir / s["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in meta.json is missing: {how} again")
            try:
                tokens = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as e:  # e.g. a header that promises more bytes than the file has
                raise DataError(f"shard {path} is truncated or corrupt ({first_line(e)}): {how} again") from e
            if tokens.dtype != np.uint16 or tokens.ndim != 1:
                raise DataError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, not 1-D uint16: "
                                f"{how} again")
            if len(tokens) != s["tokens"]:
                raise DataError(f"shard {path} has {len(tokens)} tokens but meta.json says {s['tokens']} "
                                f"(truncated or replaced): {how} again")
            self.shards.append(tokens)
        windows = [max(len(t) - 1, 0) // seq_len for t in self.shards]
        # first window number of each shard; window g lives in shard searchsorted(starts, g, 'right') - 1
        self.starts = np.cumsum([0] + windows[:-1])
        self.n_windows = sum(windows)
        if self.n_windows < world_size:
            raise DataError(f"the {split!r} split of {data_dir} has {sum(s['tokens'] for s in entries)} tokens: "
                            f"{self.n_windows} windows of seq_len + 1 = {seq_len + 1} tokens, but each of the "
                            f"{world_size} rank(s) needs at least one window: use a smaller seq_len or more data")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.reset()

    def start_epoch(self, epoch):
        self.epoch, self.pos = epoch, 0
        n = self.n_windows
        order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
        self.order = order[self.rank:n - n % self.world_size:self.world_size]

    def reset(self):
        self.start_epoch(0)

    def window(self, g):
        """Window g -> (x, y) rows of seq_len tokens, y = x shifted by one."""
        s = np.searchsorted(self.starts, g, side="right") - 1
        offset = (g - self.starts[s]) * self.seq_len
        w = self.shards[s][offset:offset + self.seq_len + 1]
        return w[:-1], w[1:]

    def next_batch(self):
        import torch  # here, not at the top: the tokenizer CLI and get_tokenizer() users need no torch (a slow import)
        x = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        y = np.empty_like(x)
        for i in range(self.batch_size):
            if self.pos == len(self.order):
                self.start_epoch(self.epoch + 1)
            x[i], y[i] = self.window(self.order[self.pos])
            self.pos += 1
        return torch.from_numpy(x), torch.from_numpy(y)

    def one_pass(self):
        """This rank's windows of one epoch, in order, batch_size at a time (the last batch may be shorter): the
        whole split once, for an eval over all of it (train.py's eval_iters=0). Leaves the reader at epoch 0."""
        import torch
        self.start_epoch(0)
        for i in range(0, len(self.order), self.batch_size):
            rows = [self.window(g) for g in self.order[i:i + self.batch_size]]
            yield tuple(torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64)) for k in (0, 1))

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "shuffle": int(self.shuffle)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        if wrong := [f"{k}={state.get(k)} (this reader: {mine[k]})" for k in mine if k not in ("epoch", "pos")
                     and state.get(k) != mine[k]]:
            raise DataError(f"data-loader state does not match this reader: {', '.join(wrong)}; resume with the "
                            "same seed, world_size, rank, seq_len and data, or start the data stream afresh")
        self.start_epoch(state["epoch"])
        self.pos = state["pos"]


class ChatReader(ShardReader):
    """SFT rows from conversations, with the order, rank split and resume of ShardReader. Each conversation is
    rendered (render_conversation) and whole conversations are packed, in order, into rows of seq_len + 1 tokens;
    the rest of a row is padding. A conversation longer than a row is dropped (counted in n_dropped): cutting it
    could cut an answer in half. y is -1 (ignored by the loss, for the main head and every MTP depth) wherever
    the token is not the assistant's: the system prompt, the user's text, the role tokens and the padding."""

    def __init__(self, conversations, batch_size, seq_len, rank=0, world_size=1, seed=1337, shuffle=True, enc=None):
        # the kept conversations' tokens end to end in C arrays (5 bytes a token; a Python (id, mask) tuple per token
        # took ~80, five times the final rows), and where each row starts in them
        ids_all, mask_all, starts, n_dropped = array("i"), array("b"), [], 0
        for messages in conversations:
            ids, mask = render_conversation(messages, enc)
            if len(ids) > seq_len + 1:
                n_dropped += 1
                continue
            if not starts or len(ids_all) - starts[-1] + len(ids) > seq_len + 1:
                starts.append(len(ids_all))
            ids_all.extend(ids)
            mask_all.extend(mask)
        if len(starts) < world_size:
            raise DataError(f"{len(starts)} rows of chat data ({len(conversations)} conversations, {n_dropped} longer "
                            f"than max_seq_len + 1 = {seq_len + 1} tokens and dropped) for {world_size} rank(s): "
                            "give more conversations or a larger max_seq_len")
        self.tokens = np.full((len(starts), seq_len + 1), EOS, dtype=np.int64)  # padding: EOS, never a target
        self.targets = np.full((len(starts), seq_len + 1), -1, dtype=np.int64)
        ids_all, mask_all = np.frombuffer(ids_all, dtype=np.intc), np.frombuffer(mask_all, dtype=np.int8)
        for i, (a, b) in enumerate(zip(starts, starts[1:] + [len(ids_all)])):
            self.tokens[i, :b - a] = ids_all[a:b]
            self.targets[i, :b - a] = np.where(mask_all[a:b] != 0, ids_all[a:b], -1)
        self.n_windows, self.n_conversations, self.n_dropped = len(starts), len(conversations) - n_dropped, n_dropped
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.reset()

    def window(self, g):
        return self.tokens[g, :-1], self.targets[g, 1:]


def read_conversations(path):
    """Conversations from a .jsonl (or .jsonl.gz) file of {"messages": [...]} lines; a DataError names a bad line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read chat data {path}: {first_line(e)}") from None
    out = []
    for i, line in enumerate(lines, 1):
        try:
            messages = json.loads(line)["messages"]
            _check_turns(messages, "assistant")
        except (json.JSONDecodeError, KeyError, TypeError, DataError) as e:
            raise DataError(f"{path} line {i}: not a conversation ({first_line(e)}); expected "
                            '{"messages": [{"role": ..., "content": ...}, ...]} ending with an assistant turn') from None
        out.append(messages)
    return out


HUB_CHECK_SECONDS = 2.0


def hub_offline_reason():
    """None if the Hugging Face Hub looks reachable, else why not (one phrase): HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    answer at once; otherwise a TCP connection to the HTTPS proxy or the Hub (HF_ENDPOINT), given up after
    HUB_CHECK_SECONDS, a hanging name lookup included (datasets would retry for half a minute)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]} is set"
    target = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT")
              or "https://huggingface.co")
    url = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_SECONDS).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port}: {first_line(e)}")

    t = threading.Thread(target=connect, daemon=True)  # a thread, so that a hanging name lookup is cut off too
    t.start()
    t.join(HUB_CHECK_SECONDS)
    return result[0] if result else f"no connection to {host}:{port} within {HUB_CHECK_SECONDS:g} s"


HUB_CHAT = {"smoltalk": ("HuggingFaceTB/smol-smoltalk", None), "gsm8k": ("openai/gsm8k", "main")}


def gsm8k_conversation(row):
    """A GSM8K row -> a conversation. The worked answer keeps its text; the calculator annotations <<48/2=24>> go
    (the model writes the arithmetic itself) and the final '#### 72' becomes 'The answer is 72.', so the answer
    is the reply's last number (what the checkers read)."""
    import re
    reasoning, _, final = row["answer"].rpartition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return [{"role": "user", "content": row["question"].strip()},
            {"role": "assistant", "content": f"{reasoning}\nThe answer is {final.strip()}."}]


def load_hub_dataset(path, hint, **kwargs):
    """datasets.load_dataset(path, **kwargs) once hub_offline_reason() finds the Hub reachable; else, or if datasets
    is missing or the dataset cannot be opened, a one-line DataError that ends with `hint`: what to do instead."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} needs the datasets package (pip install datasets); without it, {hint}") from None
    if reason := hub_offline_reason():
        raise DataError(f"could not reach the Hugging Face Hub for {path} ({reason}); offline, {hint}")
    try:
        return datasets.load_dataset(path, **kwargs)
    except ConnectionError as e:  # what datasets raises when the Hub cannot be reached
        raise DataError(f"could not reach the Hugging Face Hub for {path} ({first_line(e)}); offline, {hint}") from None
    except (OSError, ValueError) as e:  # e.g. an unknown subset
        raise DataError(f"cannot load {path} ({first_line(e)}); offline, {hint}") from None


def hub_conversations(name, split):
    """smol-smoltalk or GSM8K ('smoltalk' | 'gsm8k') through datasets, split 'train' or 'val' (their test split)."""
    path, subset = HUB_CHAT[name]
    rows = load_hub_dataset(path, "use chat_data='tasks' or a .jsonl of conversations", name=subset,
                            split="train" if split == "train" else "test")
    return [gsm8k_conversation(r) for r in rows] if name == "gsm8k" else [r["messages"] for r in rows]
