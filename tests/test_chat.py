"""The chat stage: the chat format (data/loader.py), SFT rows (ChatReader), the conversation sources, and SFT
with train.py end to end."""
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import chat
import tasks
from conftest import ROOT, TORCHRUN, exit_message, ok, one_line_error, run_forked, save_ckpt, tiny_model
from data import loader
from data.loader import (ASSISTANT, BOS, EOS, USER, ChatReader, DataError, gsm8k_conversation, read_conversations,
                         render_conversation, render_prompt)

def turn(role, content):
    return {"role": role, "content": content}


CONV = [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello!"), turn("user", "What is 2 + 2?"),
        turn("assistant", "4")]


def test_render_conversation_ids_and_mask(gpt2_enc):
    """DeepSeek-V3's template, by hand: <BOS>system<User>user<Assistant>reply<EOS>...; only the replies and their
    EOS are trained. Plain text encodes exactly as GPT-2 does (no id of it reaches the special rows)."""
    ids, mask = render_conversation(CONV)
    e = gpt2_enc.encode_ordinary
    want = ([BOS] + e("Be brief.") + [USER] + e("Hi") + [ASSISTANT] + e("Hello!") + [EOS] + [USER]
            + e("What is 2 + 2?") + [ASSISTANT] + e("4") + [EOS])
    assert ids == want and [i for i, m in zip(ids, mask) if m] == e("Hello!") + [EOS] + e("4") + [EOS]
    assert max(e("Be brief. Hi Hello! What is 2 + 2? 4")) < BOS < EOS < USER < ASSISTANT < 50304
    assert render_prompt(CONV[:4]) == want[:-len(e("4")) - 1]  # everything up to and including <Assistant>
    assert render_prompt(CONV[1:2]) == [BOS, USER] + e("Hi") + [ASSISTANT]


@pytest.mark.parametrize("bad", [[], [turn("assistant", "I start")], [turn("user", "a"), turn("user", "b")],
                                 [turn("user", "a"), turn("robot", "b")], [turn("user", "a"), turn("assistant", 3)],
                                 [turn("user", "a")],  # no reply to train on
                                 [turn("user", "a"), turn("assistant", "b"), turn("system", "c")]])
def test_turns_that_do_not_alternate_are_one_clear_error(bad):
    with pytest.raises(DataError) as e:
        render_conversation(bad)
    assert "\n" not in str(e.value) and ("turn" in str(e.value) or "list" in str(e.value))


def test_chat_reader_packs_whole_conversations_and_masks_targets():
    convs = [[turn("user", f"Question number {i}?"), turn("assistant", f"Answer {i}.")] for i in range(40)]
    long = [turn("user", "word " * 200), turn("assistant", "too long")]
    r = ChatReader(convs + [long], batch_size=4, seq_len=32, seed=1, shuffle=False)
    assert r.n_dropped == 1 and r.n_conversations == 40
    rendered = [render_conversation(c) for c in convs]
    # rebuild the rows by hand: whole conversations, in order, while they fit in seq_len + 1 tokens
    rows, row = [], []
    for ids, mask in rendered:
        if len(row) + len(ids) > 33:
            rows.append(row)
            row = []
        row += list(zip(ids, mask))
    rows.append(row)
    assert r.n_windows == len(rows)
    x, y = r.next_batch()
    assert x.shape == y.shape == (4, 32)
    for i in range(4):
        ids = [t for t, _ in rows[i]] + [EOS] * (33 - len(rows[i]))
        tgt = [t if m else -1 for t, m in rows[i]] + [-1] * (33 - len(rows[i]))
        assert x[i].tolist() == ids[:-1] and y[i].tolist() == tgt[1:] and x[i, 0] == BOS  # no conversation is cut
    # exact resume: the state before a batch gives that batch again
    r2, r3 = (ChatReader(convs, batch_size=4, seq_len=32, seed=1) for _ in range(2))
    r2.next_batch()
    state, want = r2.state_dict(), r2.next_batch()
    r3.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(r3.next_batch(), want))


def test_conversation_files_and_gsm8k_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": CONV[1:3]}) + "\n")
    assert read_conversations(path) == [CONV, CONV[1:3]]
    path.write_text(json.dumps({"messages": CONV[:2]}) + "\n")
    with pytest.raises(DataError, match="c.jsonl line 1: not a conversation"):
        read_conversations(path)
    # GSM8K's format (a fixture row as datasets gives it): calculator annotations go, the answer is the last number
    row = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                       "May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}
    conv = gsm8k_conversation(row)
    assert conv[0] == turn("user", row["question"]) and conv[1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                                                             "Natalia sold 48+24 = 72 clips altogether "
                                                                             "in April and May.\nThe answer is 72.")
    assert tasks.check_gsm8k(conv[1]["content"], "72")  # GSM8K's checker (GRPO's reward) reads it
    render_conversation(conv)


# ---- chat.py: the cache across turns, the one-shot CLI, the task eval ---------------------------------------

@pytest.fixture(scope="module")
def chat_model():
    """A random tiny model with the padded GPT-2 vocabulary (rows for the chat tokens) and one MTP module."""
    return tiny_model(0, vocab_size=50304, max_seq_len=96).eval()


@pytest.mark.parametrize("speculative", [False, True])
def test_multi_turn_reply_with_the_kept_cache_equals_a_from_scratch_forward(chat_model, gpt2_enc, speculative):
    """Turn 2 decodes only its new tokens (the cache holds turn 1), and its greedy reply is what a full forward over
    the whole conversation picks at every step; MTP speculation changes nothing in greedy output."""
    m = chat_model
    session = chat.Chat(m, gpt2_enc, temperature=0.0, speculative=speculative)
    first = list(session.reply("Hello there", 6))
    before = list(session.ids)
    fed, decode = [], m.decode
    m.decode = lambda idx, cache, start_pos: fed.append((start_pos, idx.shape[1])) or decode(idx, cache, start_pos)
    try:
        second = list(session.reply("And again?", 6))
    finally:
        m.decode = decode
    prompt = before + ([EOS] if before[-1] != EOS else []) + [USER] + gpt2_enc.encode_ordinary("And again?") + [ASSISTANT]
    assert session.ids[:len(prompt)] == prompt
    assert fed[0] == (len(before) - 1, len(prompt) - len(before) + 1)  # from the last uncached token on, no more
    assert prompt == render_prompt([turn("user", "Hello there"), turn("assistant", gpt2_enc.decode(first)),
                                    turn("user", "And again?")]) or first == []
    with torch.no_grad():
        seq = list(prompt)
        for tok in second:  # greedy over the first EOS + 1 ids, from the full forward
            assert int(m(torch.tensor([seq]))[0][0, -1, :EOS + 1].argmax()) == tok
            seq.append(tok)
    assert len(first) > 0 and len(second) > 0


def test_a_full_context_drops_the_oldest_exchange_only(chat_model, gpt2_enc):
    """When the next turn does not fit, the oldest user + assistant pair goes first; the system prompt and the
    latest exchanges stay (the model's context is 96 tokens here)."""
    session = chat.Chat(chat_model, gpt2_enc, system="Be brief.", temperature=0.0)
    asked, dropped = [], False
    for i in range(8):
        asked.append(f"Message number {i} with some words in it.")
        list(session.reply(asked[-1], 8))
        users = [m["content"] for m in session.messages if m["role"] == "user"]
        dropped = dropped or len(users) < len(asked)
        assert session.messages[0] == turn("system", "Be brief.")
        assert users == asked[len(asked) - len(users):] and len(users) >= min(i + 1, 2), users  # oldest go first
        assert len(session.ids) <= chat_model.cfg.max_seq_len
    assert dropped  # the context did fill


def test_chat_cli_one_reply_and_task_eval(chat_model, tmp_path):
    ckpt = save_ckpt(tmp_path / "sft", chat_model, step=7, config={"chat_data": "tasks"})
    p = ok(run_forked("chat.py", f"--out_dir={ckpt}", "--prompt=Which is larger, 41 or 17?", "--device=cpu",
                      "--temperature=0", "--max_new_tokens=5", timeout=120))
    assert p.stdout.endswith("\n") and p.stdout.count("\n") <= 6 and "chat.py" not in p.stdout  # the reply only
    p = ok(run_forked("chat.py", f"--out_dir={ckpt}", "--eval_tasks=2", "--device=cpu", timeout=300))
    res = json.loads((ckpt / "chat_eval.json").read_text())["tasks"]
    assert set(res) == set(tasks.TASKS) and all(r["n"] == 2 for r in res.values())
    assert all(0 <= r["pass1"] <= 1 and 0 <= r["prior"] <= 1 and r["prior_rule"] for r in res.values())
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(tasks.TASKS)  # one per task: greedy, sampled pass@1, the best prior rule
    assert all("greedy" in ln and "sampled pass@1" in ln and "best prior rule" in ln for ln in lines)
    assert exit_message(chat.main, [f"--out_dir={tmp_path / 'none'}", "--prompt=hi"]).startswith(
        "chat.py: error: no checkpoint")


def test_task_eval_samples_at_eval_temperature(chat_model, tmp_path, monkeypatch):
    """--eval_temperature is the temperature of the sampled pass@1 (a GRPO policy's own), recorded in chat_eval.json;
    0 is refused in one line."""
    ckpt = save_ckpt(tmp_path / "sft", chat_model, step=7, config={"chat_data": "tasks"})
    seen = []
    real = chat.sample_replies
    monkeypatch.setattr(chat, "sample_replies", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    chat.main([f"--out_dir={ckpt}", "--eval_tasks=1", "--eval_samples=2", "--eval_temperature=0.7", "--device=cpu"])
    assert seen == [0.7] * len(tasks.TASKS)
    assert json.loads((ckpt / "chat_eval.json").read_text())["eval_temperature"] == 0.7
    assert "eval_temperature > 0" in exit_message(chat.main, [f"--out_dir={ckpt}", "--eval_tasks=1",
                                                             "--eval_temperature=0"])


# ---- SFT with train.py --------------------------------------------------------------------------------------

def test_masked_targets_are_left_out_of_every_loss(chat_model):
    """-1 targets count in neither the main CE nor any MTP depth's: the loss is the mean over the others."""
    x = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    y = torch.full_like(x, -1)
    y[0, 5], y[1, 9], y[1, 15] = 7, 8, 9
    logits, parts = chat_model(x, y)
    keep = y >= 0
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)
    h, _ = chat_model.trunk(x)
    mod = chat_model.mtp[0]
    h1, _ = mod(h[:, :-1], chat_model.embed(x[:, 1:]), chat_model.rope_cos[:19], chat_model.rope_sin[:19])
    l1 = chat_model.head(mod.norm(h1))
    keep1 = y[:, 1:] >= 0
    assert parts["mtp"][0].item() == pytest.approx(F.cross_entropy(l1[keep1], y[:, 1:][keep1]).item(), rel=1e-5)


def test_the_head_on_trained_positions_only_gives_the_same_loss_and_gradients(chat_model):
    """trained_only=True (SFT's fast path: the head runs on the N trained positions only) returns (N, vocab) logits
    equal to the full ones at those positions, and the same losses and gradients."""
    m = chat_model
    x = torch.randint(0, 50000, (3, 40), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50000, (3, 40), generator=torch.Generator().manual_seed(2))
    y[torch.rand(3, 40, generator=torch.Generator().manual_seed(3)) < 0.7] = -1
    params = [p for p in m.parameters() if p.requires_grad]
    out = []
    for trained_only in (False, True):
        logits, parts = m(x, y, trained_only=trained_only)
        loss = parts["ce"] + parts["mtp"].sum()
        out.append((logits, parts, torch.autograd.grad(loss, params, allow_unused=True)))
    (full, a, ga), (kept, b, gb) = out
    assert kept.shape == (int((y >= 0).sum()), full.size(-1)) and torch.allclose(kept, full[y >= 0], atol=1e-5)
    assert torch.allclose(a["ce"], b["ce"], atol=1e-5) and torch.allclose(a["mtp"], b["mtp"], atol=1e-5)
    assert all((u is None) == (v is None) and (u is None or torch.allclose(u, v, atol=1e-6)) for u, v in zip(ga, gb))


def run_sft(out, base, *args, launch=()):
    """train.py's SFT after `launch` (torchrun), as conftest.run_forked's process (torchrun: its launcher)."""
    p = ok(run_forked(
        *launch, "train.py", f"--init_from={base}", f"--out_dir={out}", "--chat_data=tasks,data/chat_sample.jsonl",
        "--chat_tasks=40", "--device=cpu", "--dtype=float32", "--compile=False", "--batch_size=2",
        "--total_batch_size=384", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=2", "--lr_decay_iters=6",
        "--eval_iters=2", "--log_interval=1", "--sample_tokens=0", "--bias_update_speed=0.0", *args))
    return p, [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("launch", [(), TORCHRUN], ids=["one_process", "torchrun"])
def test_sft_val_loss_is_per_trained_token_over_the_whole_held_out_split(chat_model, tmp_path, launch):
    """eval_iters=0: every held-out row once (2 ranks: all but the odd one out), and the val loss of the main head
    and of MTP is per trained token, as a slow reference (one row at a time, each row's mean times its tokens)
    gives it. The replies are 1 token long in the first held-out conversations and 30 in the last, so a mean of
    row or batch means (what the eval did before) differs from it."""
    convs = [[turn("user", f"Question {i}?"), turn("assistant", " yes" if i < 300 else " and so on" * 10)]
             for i in range(390)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    base = save_ckpt(tmp_path / "base", chat_model, step=200)
    run_sft(tmp_path / "out", base, f"--chat_data={data}", "--max_iters=0", "--eval_iters=0",
            launch=launch)
    got = json.loads(open(tmp_path / "out" / "eval.jsonl").readline())

    world = 2 if launch else 1
    reader = ChatReader([c for i, c in enumerate(convs) if i % 10 == 0], 1, 96, shuffle=False)
    n_rows = reader.n_windows - reader.n_windows % world
    sums = torch.zeros(4, dtype=torch.float64)
    means = []
    with torch.no_grad():
        for g in range(n_rows):
            x, y = (torch.from_numpy(a[None]) for a in reader.window(g))
            _, parts = chat_model(x, y)
            n, n_mtp = (y >= 0).sum(), (y[:, 1:] >= 0).sum()
            sums += torch.stack([parts["ce"] * n, parts["mtp"][0] * n_mtp, n, n_mtp]).double()
            means.append(parts["ce"].item())
    assert reader.n_windows == 7  # at batch_size 2: a short last batch, on 1 rank and on 2
    assert got["val_loss"] == pytest.approx((sums[0] / sums[2]).item(), rel=1e-5)
    assert got["val_mtp"] == pytest.approx((sums[1] / sums[3]).item(), rel=1e-5)
    assert abs(got["val_loss"] - sum(means) / len(means)) > 1e-3  # 100x the tolerance: an unweighted mean fails
    if not launch:  # dev/val_by_source.py packs each source alone: with one source, it is train.py's val loss
        sys.path.insert(0, str(ROOT / "dev"))
        import val_by_source
        (source, held), = val_by_source.held_out({"chat_data": str(data), "chat_tasks": 40, "seed": 1337}).items()
        total, n = val_by_source.reply_loss(chat_model, held, 96)
        assert source == "chats.jsonl" and n == sums[2] and total / n == pytest.approx(got["val_loss"], rel=1e-5)


def test_sft_from_a_pretrained_out_dir_resumes_exactly_and_runs_under_ddp(chat_model, tmp_path):
    """train.py with init_from=<pretrained out_dir> and chat_data: the architecture comes from the checkpoint (the
    command names none), the weights too; exact resume and 2-process DDP work as in pretraining."""
    base = save_ckpt(tmp_path / "base", chat_model, step=200)
    p, straight = run_sft(tmp_path / "straight", base, "--max_iters=6", "--eval_interval=3")
    assert "initialised from" in p.stdout and "chat data:" in p.stdout and "held out" in p.stdout
    assert [r["step"] for r in straight] == list(range(1, 7))
    ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["max_seq_len"] == 96 and ckpt["config"]["chat_data"].startswith("tasks")
    run_sft(tmp_path / "split", base, "--max_iters=3", "--eval_interval=3")
    _, split = run_sft(tmp_path / "split", base, "--max_iters=6", "--eval_interval=3", "--init_from=resume")
    assert [(r["loss"], r["ce"], r["mtp"]) for r in split] == [(r["loss"], r["ce"], r["mtp"]) for r in straight]
    # one row per micro-batch, so both runs average the same per-row means (a mean over each micro-batch's
    # assistant tokens, then over micro-batches and ranks: rows with more answer tokens do not weigh more)
    _, single = run_sft(tmp_path / "single", base, "--max_iters=4", "--eval_interval=100", "--batch_size=1",
                        "--total_batch_size=192")
    p, ddp = run_sft(tmp_path / "ddp", base, "--max_iters=4", "--eval_interval=100", "--batch_size=1",
                     "--total_batch_size=192", launch=TORCHRUN)
    assert "2 processes x 1 accumulation steps" in p.stdout
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)


def test_hub_chat_sources_and_gsm8k_eval_on_an_offline_fixture(monkeypatch, chat_model, gpt2_enc):
    """The GPU recipe's loaders, on rows in the datasets' own formats (a stand-in `datasets` module: no network):
    smol-smoltalk's `messages` pass through, GSM8K's rows become conversations, and chat.py's GSM8K score reads the
    final number. Offline (the Hub check fails), one line."""
    rows = {("HuggingFaceTB/smol-smoltalk", "train"): [{"messages": CONV[1:3], "source": "x"}],
            ("openai/gsm8k", "test"): [{"question": "What is 2 + 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
                                       {"question": "What is 4 + 4?", "answer": "#### 8"}]}
    asked = []
    load_dataset = lambda path, name=None, split=None: asked.append((path, name, split)) or rows[(path, split)]  # noqa
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(loader, "hub_offline_reason", lambda: None)
    assert loader.hub_conversations("smoltalk", "train") == [CONV[1:3]]
    gsm = loader.hub_conversations("gsm8k", "val")
    assert asked[-1] == ("openai/gsm8k", "main", "test") and gsm[0][1]["content"] == "2+3=5\nThe answer is 5."
    monkeypatch.setattr(chat, "complete", lambda model, enc, convs, max_new_tokens: ["so 5", "it is 9"])
    assert chat.evaluate_gsm8k(chat_model, gpt2_enc, 2) == {"correct": 1, "n": 2, "accuracy": 0.5}
    monkeypatch.setattr(loader, "hub_offline_reason", lambda: "HF_HUB_OFFLINE=1 is set")
    with pytest.raises(DataError, match="could not reach the Hugging Face Hub for openai/gsm8k") as e:
        loader.hub_conversations("gsm8k", "train")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arg, says", [("--chat_guess=compare,mul", "chat_guess names unknown tasks ['mul']"),
                                       ("--lora_tokens=all", "lora_tokens must be 'chat', 'replies' or ''")])
def test_bad_chat_settings_stop_in_one_line(chat_model, tmp_path, arg, says):
    base = save_ckpt(tmp_path / "base", chat_model, step=1)
    p = run_forked("train.py", f"--init_from={base}", f"--out_dir={tmp_path / 'out'}", "--chat_data=tasks",
                   "--device=cpu", "--compile=False", "--batch_size=2", "--total_batch_size=192", arg, timeout=120)
    assert says in one_line_error(p, "train.py")
