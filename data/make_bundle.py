"""Regenerate the two data files that ship with the repository (see data/README.md):

    python data/make_bundle.py --gpt2_dir DIR --fineweb_csv FILE

  data/gpt2.tiktoken.gz            <- DIR/vocab.bpe + DIR/encoder.json (OpenAI's GPT-2 BPE files)
  data/fineweb_edu_sample.jsonl.gz <- FILE, a CSV of FineWeb-Edu documents (only its `text` column is kept)

Either argument may be left out to rebuild only the other file. Both outputs are gzip streams with mtime 0 and
no file name in the header, so the same inputs always give byte-identical files.

gpt2.tiktoken.gz is tiktoken's `.tiktoken` format: one line per token, `base64(token bytes) rank`, in rank
order (ranks 0..50255; <|endoftext|> = 50256 is a special token and is not listed). GPT-2 stores its tokens as
strings in which every byte is shown as a printable unicode character; bytes_to_unicode() (data/loader.py) rebuilds that
table so that each string can be turned back into the bytes it stands for. vocab.bpe is used as a check: its
i-th merge "a b" must be the token of rank 256 + i, and a + b must be its bytes.

fineweb_edu_sample.jsonl.gz holds one JSON object {"text": ...} per line, in the CSV's row order.
"""
import argparse
import base64
import csv
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script (python data/make_bundle.py)
from data.loader import EOT, bytes_to_unicode  # noqa: E402  (ranks 0..EOT-1; EOT is <|endoftext|>)

HERE = Path(__file__).resolve().parent
TOKENIZER_OUT = HERE / "gpt2.tiktoken.gz"
SAMPLE_OUT = HERE / "fineweb_edu_sample.jsonl.gz"


def gpt2_ranks(gpt2_dir):
    """{token bytes: rank} from encoder.json, checked against vocab.bpe's merge list."""
    gpt2_dir = Path(gpt2_dir)
    encoder = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(char_to_byte[c] for c in token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}
    if sorted(ranks.values()) != list(range(EOT)):
        sys.exit(f"make_bundle.py: {gpt2_dir / 'encoder.json'}: expected ranks 0..{EOT - 1}")
    if sorted(ranks.get(bytes([b]), -1) for b in range(256)) != list(range(256)):
        sys.exit("make_bundle.py: the 256 single-byte tokens do not hold ranks 0..255")

    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [line.split(" ") for line in lines[1:] if line]  # line 0 is a '#version' header
    if len(merges) != EOT - 256:
        sys.exit(f"make_bundle.py: {gpt2_dir / 'vocab.bpe'}: expected {EOT - 256} merges, got {len(merges)}")
    for i, (a, b) in enumerate(merges):
        merged = bytes(char_to_byte[c] for c in a + b)
        if ranks.get(merged) != 256 + i:
            sys.exit(f"make_bundle.py: merge {i} ({a!r} {b!r}) is not token {256 + i} of encoder.json")
    return ranks


def write_gzip(path, data):
    """gzip with a fixed header (mtime 0, no file name) so that the output depends on `data` only."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as f:
        f.write(data)
    path.write_bytes(buf.getvalue())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path.name}: {path.stat().st_size:,} bytes, sha256 {digest}")


def make_tokenizer(gpt2_dir, out=TOKENIZER_OUT):
    ranks = gpt2_ranks(gpt2_dir)
    text = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                   for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    write_gzip(out, text.encode("ascii"))


def make_sample(csv_path, out=SAMPLE_OUT):
    csv.field_size_limit(sys.maxsize)  # documents are longer than csv's default field limit
    with open(csv_path, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    write_gzip(out, text.encode("utf-8"))
    print(f"  {len(texts)} documents, {sum(map(len, texts)):,} characters")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make_bundle.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2_dir", type=Path, help="folder holding GPT-2's vocab.bpe and encoder.json")
    parser.add_argument("--fineweb_csv", type=Path, help="CSV of FineWeb-Edu documents with a `text` column")
    args = parser.parse_args(argv)
    if not args.gpt2_dir and not args.fineweb_csv:
        parser.error("give --gpt2_dir and/or --fineweb_csv")
    if args.gpt2_dir:
        make_tokenizer(args.gpt2_dir)
    if args.fineweb_csv:
        make_sample(args.fineweb_csv)


if __name__ == "__main__":
    main()
