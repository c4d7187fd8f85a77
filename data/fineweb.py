"""FineWeb-Edu (or local text files) -> GPT-2 token shards: the data preparation script.

    python data/fineweb.py                                  # HuggingFaceFW/fineweb-edu, subset sample-10BT
    python data/fineweb.py --subset sample-100BT            # another subset
    python data/fineweb.py --input corpus/ more.jsonl --out_dir data/mycorpus   # local files, offline
    python data/fineweb.py --input data/fineweb_edu_sample.jsonl.gz --out_dir data/fineweb_edu_sample \
        --shard_size 20000                                   # the bundled 150-document sample (what
                                                             # prepare_sample() and config/train_tiny.py use)

Every document is tokenized with GPT-2's BPE (tiktoken, built from the bundled data/gpt2.tiktoken.gz: nothing is
downloaded) and preceded by <|endoftext|> (50256), as in build-nanogpt. Tokens go into uint16 shards of
--shard_size tokens, saved with np.save (so each file says its own dtype and length): <prefix>_val_000000.npy
first, then <prefix>_train_000001.npy, ... A document may run across a shard boundary; the last, partial shard
is written too. meta.json in --out_dir records the tokenizer, vocab size, eot id, dtype, the shards (file,
split, tokens) and the source.

Local files (--input; a directory stands for its supported files, recursively, in sorted order):
  .parquet, .jsonl, .json (JSON lines, or one JSON array of objects) -> the `text` field of each record,
  .csv -> the `text` column of each row,
  .txt -> one document per block of lines; blocks are separated by one or more blank (or whitespace-only) lines.
  .jsonl.gz, .json.gz, .csv.gz, .txt.gz -> the same, gzip-compressed.

Offline: the Hub path checks first that the Hub can be reached (at once if HF_HUB_OFFLINE or HF_DATASETS_OFFLINE
is set, else a 2 s connection test) and stops with a one-line error pointing to --input if not.

Resuming: each shard is written to a temp file and renamed when whole, then meta.json (also written atomically)
records how many documents are in the finished shards. Rerunning the same command skips those documents
without tokenizing them and continues with the next shard; the result is byte-identical to an uninterrupted
run. A file named *.npy is always a complete shard. train.py reads the shards with data/loader.py's ShardReader.
"""
import argparse
import contextlib
import csv
import gzip
import itertools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script (python data/fineweb.py), too
from configurator import one_line_errors  # noqa: E402
from data.loader import (HERE, DataError, atomic_write, first_line, get_tokenizer, load_hub_dataset,  # noqa: E402
                         write_json)

HUB_DATASET = "HuggingFaceFW/fineweb-edu"
INPUT_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".txt")
GZ_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")  # these may also come gzip-compressed, as NAME.jsonl.gz etc.
DEFAULT_OUT_DIR = HERE / "fineweb_edu"

# files that ship with the repository (data/README.md: source, licence, how to regenerate them)
SAMPLE_FILE = HERE / "fineweb_edu_sample.jsonl.gz"     # 150 FineWeb-Edu documents (ODC-By 1.0)
SAMPLE_DIR = HERE / "fineweb_edu_sample"               # where prepare_sample() puts its shards (git-ignored)
SAMPLE_SHARD_SIZE = 20000                              # ~89k tokens -> 1 val + 4 train shards


def tokenize(text):
    """One document -> uint16 tokens, with <|endoftext|> in front so that every document starts a fresh context."""
    enc = get_tokenizer()  # a dict lookup after the first call; works the same in pool workers
    return np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)


# ----------------------------------------------------------------------------------------------------------------
# document sources: each yields the texts of its documents, in a fixed order (resuming depends on it)

def hub_documents(subset):
    # streaming: parquet files are read as they download, so the corpus never sits on disk twice
    ds = load_hub_dataset(HUB_DATASET, f"tokenize local files with --input PATH... ({SUPPORTED}), e.g. the bundled "
                          f"sample: --input {SAMPLE_FILE}", name=subset, split="train", streaming=True)
    return (row["text"] for row in ds)


def input_kind(path):
    """The format of an input file: its suffix, or for NAME.jsonl.gz etc. the suffix under .gz; None if unsupported."""
    if path.suffix == ".gz":
        inner = Path(path.stem).suffix
        return inner if inner in GZ_SUFFIXES else None
    return path.suffix if path.suffix in INPUT_SUFFIXES else None


def open_text(path, newline=None):
    """A text file, or a gzip-compressed one (NAME.jsonl.gz etc.), opened for reading as UTF-8."""
    return (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", newline=newline)


SUPPORTED = ", ".join(INPUT_SUFFIXES + tuple(x + ".gz" for x in GZ_SUFFIXES))


def expand_inputs(paths):
    """--input arguments -> the list of files to read: directories expand to their supported files, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and input_kind(f))
            if not found:
                raise DataError(f"--input directory {p} holds no {SUPPORTED} files")
            files += found
        elif not p.is_file():
            raise DataError(f"--input {p} does not exist")
        elif not input_kind(p):
            raise DataError(f"--input {p}: unsupported file type {''.join(p.suffixes[-2:])!r} (use {SUPPORTED})")
        else:
            files.append(p)
    return [f.resolve() for f in files]


def text_of(record, where):
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{where}: expected a record with a string field 'text'")
    return record["text"]


def file_documents(path):
    """The texts of one --input file; a file that cannot be read or decoded is a one-line DataError naming it."""
    try:
        yield from _file_documents(path)
    except (OSError, EOFError, ValueError, csv.Error) as e:  # bad gzip or parquet, not UTF-8, broken CSV quoting
        raise DataError(f"{path}: cannot read it ({first_line(e)})") from e


def _file_documents(path):
    kind = input_kind(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            yield from batch.column(0).to_pylist()
    elif kind == ".csv":
        csv.field_size_limit(sys.maxsize)  # documents are far longer than csv's default 128 KiB field limit
        with open_text(path, newline="") as f:
            rows = csv.DictReader(f)
            if "text" not in (rows.fieldnames or []):
                raise DataError(f"{path}: no 'text' column (columns: {', '.join(rows.fieldnames or [])})")
            for row in rows:
                yield row["text"]
    elif kind == ".txt":
        with open_text(path) as f:  # a document per run of non-blank lines, without its last newline
            for nonblank, lines in itertools.groupby(f, key=lambda line: bool(line.strip())):
                if nonblank:
                    yield "".join(lines).rstrip("\n")
    else:  # .jsonl, or .json holding either JSON lines or one array of records
        with open_text(path) as f:
            if f.read(1024).lstrip().startswith("["):
                f.seek(0)
                for i, record in enumerate(json.load(f)):
                    yield text_of(record, f"{path} record {i}")
                return
            f.seek(0)
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {i}: not valid JSON ({e})") from e
                    yield text_of(record, f"{path} line {i}")


# ----------------------------------------------------------------------------------------------------------------
# the shard writer

def write_shard(path, tokens):
    atomic_write(path, lambda f: np.save(f, tokens))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fineweb.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="tokenize local files instead of downloading: .parquet/.jsonl/.json (field 'text'), "
                             ".csv (column 'text'), .txt (one document per blank-line-separated block); "
                             "directories expand to their supported files, sorted")
    parser.add_argument("--subset", default="sample-10BT", help=f"{HUB_DATASET} subset (default: %(default)s)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="where the shards and meta.json go (default: fineweb_edu/ next to this script)")
    parser.add_argument("--prefix", default="edufineweb", help="shard file name prefix (default: %(default)s)")
    parser.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count(),
                        help="tokenizer processes; 1 tokenizes in this process (default: cpu count, %(default)s)")
    parser.add_argument("--max_docs", type=int, help="stop after this many documents")
    parser.add_argument("--max_tokens", type=int, help="stop after this many tokens (cuts the last document)")
    args = parser.parse_args(argv)
    for name in ("shard_size", "num_workers", "max_docs", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    return args


def build(args):
    """Tokenize the documents of args' source into shards (resuming a previous run); returns a summary line."""
    enc = get_tokenizer()  # fail before anything else if the tokenizer cannot be loaded
    inputs = expand_inputs(args.input) if args.input else None
    # everything that decides the shards' content: a rerun must use the same settings to resume
    settings = {"dataset": None if inputs else HUB_DATASET, "subset": None if inputs else args.subset,
                "inputs": [str(f) for f in inputs] if inputs else None, "shard_size": args.shard_size,
                "prefix": args.prefix, "max_docs": args.max_docs, "max_tokens": args.max_tokens}
    out_dir = args.out_dir
    if (out_dir / "meta.json").exists():
        meta = json.loads((out_dir / "meta.json").read_text())
        if meta.get("settings") != settings:
            raise DataError(f"{out_dir} already holds shards made with other settings ({meta.get('settings')}); "
                            "rerun with those settings to resume, or choose another --out_dir")
        if meta["complete"]:
            return (f"fineweb.py: {out_dir} is already complete ({len(meta['shards'])} shards, "
                    f"{sum(s['tokens'] for s in meta['shards']):,} tokens); nothing to do")
    else:
        meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot": enc.eot_token, "dtype": "uint16",
                "source": (f"local files: {len(inputs)} file(s) given with --input" if inputs else
                           f"{HUB_DATASET}, subset {args.subset}, split train, streamed with datasets"),
                "settings": settings, "shards": [],
                "docs": 0,        # documents written to the finished shards ...
                "doc_offset": 0,  # ... and how many tokens of the next document the last shard already holds
                "complete": False}
    shards_before = len(meta["shards"])
    tokens_before = sum(s["tokens"] for s in meta["shards"])
    for leftover in out_dir.glob(f"{args.prefix}_*.npy.*tmp"):  # a killed run's temp shard: never renamed
        leftover.unlink()

    t0 = time.time()
    buf = np.empty(args.shard_size, dtype=np.uint16)
    fill, new_tokens, new_docs = 0, 0, 0  # tokens in buf; tokens written (or buffered), documents tokenized by this run

    def flush():
        index = len(meta["shards"])
        split = "val" if index == 0 else "train"
        name = f"{args.prefix}_{split}_{index:06d}.npy"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_shard(out_dir / name, buf[:fill])
        meta["shards"].append({"file": name, "split": split, "tokens": fill})
        write_json(out_dir / "meta.json", meta)

    # the pool is started before the source is opened, so no datasets/network threads get forked
    with (multiprocessing.Pool(args.num_workers) if args.num_workers > 1 else contextlib.nullcontext()) as pool:
        texts = hub_documents(args.subset) if inputs is None else (t for f in inputs for t in file_documents(f))
        # documents already in finished shards are skipped without tokenizing them
        texts = itertools.islice(texts, meta["docs"], args.max_docs)
        token_docs = pool.imap(tokenize, texts, chunksize=16) if pool else map(tokenize, texts)
        bar = tqdm(total=args.max_tokens and args.max_tokens - tokens_before, unit="tok", unit_scale=True,
                   desc=f"tokenizing into {out_dir}", file=sys.stderr)
        for tokens in token_docs:
            new_docs += 1
            tokens = tokens[meta["doc_offset"]:]  # nonzero only for the first document after resuming
            if args.max_tokens:
                tokens = tokens[:args.max_tokens - tokens_before - new_tokens]
            new_tokens += len(tokens)
            bar.update(len(tokens))
            while len(tokens):
                n = min(len(tokens), args.shard_size - fill)
                buf[fill:fill + n] = tokens[:n]
                fill += n
                meta["doc_offset"] += n
                tokens = tokens[n:]
                if fill == args.shard_size:
                    flush()
                    fill = 0
            meta["docs"] += 1
            meta["doc_offset"] = 0
            if new_docs % 1000 == 0:
                bar.set_postfix(docs=f"{meta['docs']:,}", shards=len(meta["shards"]), refresh=False)
            if args.max_tokens and tokens_before + new_tokens == args.max_tokens:
                break
        bar.close()
    if fill:
        flush()
    if not meta["shards"]:
        raise DataError("no documents found in the input; nothing was written")
    meta["complete"] = True
    write_json(out_dir / "meta.json", meta)

    seconds = time.time() - t0
    n_val = sum(s["split"] == "val" for s in meta["shards"])
    resumed = f", resumed after {shards_before} finished shards" if shards_before else ""
    n_shards = len(meta["shards"])
    return (f"fineweb.py: {n_shards} shards ({n_val} val, {n_shards - n_val} train) in {out_dir}, "
            f"{tokens_before + new_tokens:,} tokens, {meta['docs']:,} docs; this run: {new_tokens:,} tokens, "
            f"{new_docs:,} docs in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):,.0f} tokens/s){resumed}")


def prepare_sample(out_dir=SAMPLE_DIR):
    """Tokenize the bundled FineWeb-Edu sample (150 documents, ~89k tokens) into out_dir: 1 val + 4 train shards
    of SAMPLE_SHARD_SIZE tokens. About a second, offline; resumes/no-ops like the CLI. Returns the summary line."""
    print(f"fineweb.py: tokenizing the bundled FineWeb-Edu sample {SAMPLE_FILE.name} into {out_dir} (first use)",
          flush=True)
    summary = build(parse_args(["--input", str(SAMPLE_FILE), "--out_dir", str(out_dir),
                                "--shard_size", str(SAMPLE_SHARD_SIZE), "--num_workers", "1"]))
    print(summary, flush=True)
    return summary


@one_line_errors("fineweb.py")
def main(argv=None):
    print(build(parse_args(argv)))


if __name__ == "__main__":
    main()
