"""What every script imports from data/: the GPT-2 tokenizer (bundled, offline), the check of token ids against a
model's vocabulary, the data error type, the atomic file writer, and ShardReader, which cuts the token shards
made by data/fineweb.py into training windows. The chat format (special tokens in the spare ids 50257..50303 of
the padded vocabulary) will live beside the tokenizer.

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
    path = Path(path)
    try:
        ranks = {}
        with gzip.open(path, "rt", encoding="ascii") as f:
            for line in f:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
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


def bytes_to_unicode():
    """GPT-2's byte -> character table. Bytes that are printable and not a space stand for themselves (the
    ranges '!'..'~', '¡'..'¬', '®'..'ÿ'); every other byte, in increasing order, gets the next code point
    from 256 upwards. Returns {byte value: character}."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    extra = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(extra)
            extra += 1
    return table


def atomic_write(path, write, mode="wb"):
    """Write a file through write(f) to a temp file beside it, flush it to disk, then rename it over path: a file
    with the final name is always whole, and a failed write leaves the previous file and no temp file. The temp
    name is unique to this call, so writers racing for the same path (e.g. DDP ranks) never clobber each other's
    temp file: the last rename wins and every reader sees one whole file. Every file the project writes (shards,
    meta.json, checkpoints, downloads, results) goes through here."""
    path = str(path)
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

    def next_batch(self):
        import torch  # here, not at the top: the tokenizer CLI and get_tokenizer() users need no torch (a slow import)
        T = self.seq_len
        buf = np.empty((self.batch_size, T + 1), dtype=np.int64)
        for i in range(self.batch_size):
            if self.pos == len(self.order):
                self.start_epoch(self.epoch + 1)
            g = self.order[self.pos]
            self.pos += 1
            s = np.searchsorted(self.starts, g, side="right") - 1
            offset = (g - self.starts[s]) * T
            buf[i] = self.shards[s][offset:offset + T + 1]
        w = torch.from_numpy(buf)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "shuffle": int(self.shuffle)}

    def load_state_dict(self, state):
        mine = self.state_dict()
        wrong = [f"{k}={state.get(k)} (this reader: {mine[k]})" for k in mine if k not in ("epoch", "pos")
                 and state.get(k) != mine[k]]
        if wrong:
            raise DataError(f"data-loader state does not match this reader: {', '.join(wrong)}; resume with the "
                            "same seed, world_size, rank, seq_len and data, or start the data stream afresh")
        self.start_epoch(state["epoch"])
        self.pos = state["pos"]
