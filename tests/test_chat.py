"""The chat stage: the chat format (data/loader.py), SFT rows (ChatReader), the conversation sources, and SFT
with train.py end to end."""
import json

import numpy as np
import pytest

from data.loader import (ASSISTANT, BOS, EOS, USER, ChatReader, DataError, gsm8k_conversation, read_conversations,
                         render_conversation, render_prompt)

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}]


def test_render_conversation_ids_and_mask(gpt2_enc):
    """DeepSeek-V3's template, by hand: <BOS>system<User>user<Assistant>reply<EOS>...; only the replies and their
    EOS are trained. Plain text encodes exactly as GPT-2 does (no id of it reaches the special rows)."""
    ids, mask = render_conversation(CONV)
    e = gpt2_enc.encode_ordinary
    want = ([BOS] + e("Be brief.") + [USER] + e("Hi") + [ASSISTANT] + e("Hello!") + [EOS] + [USER]
            + e("What is 2 + 2?") + [ASSISTANT] + e("4") + [EOS])
    assert ids == want
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == e("Hello!") + [EOS] + e("4") + [EOS]
    assert max(e("Be brief. Hi Hello! What is 2 + 2? 4")) < BOS < EOS < USER < ASSISTANT < 50304
    assert render_prompt(CONV[:4]) == want[:-len(e("4")) - 1]  # everything up to and including <Assistant>
    assert render_prompt(CONV[1:2]) == [BOS, USER] + e("Hi") + [ASSISTANT]


@pytest.mark.parametrize("bad", [
    [],
    [{"role": "assistant", "content": "I start"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
    [{"role": "user", "content": "a"}],                                   # no reply to train on
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
])
def test_turns_that_do_not_alternate_are_one_clear_error(bad):
    with pytest.raises(DataError) as e:
        render_conversation(bad)
    assert "\n" not in str(e.value) and ("turn" in str(e.value) or "list" in str(e.value))


def test_chat_reader_packs_whole_conversations_and_masks_targets():
    convs = [[{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(40)]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "too long"}]
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
        assert x[i].tolist() == ids[:-1] and y[i].tolist() == tgt[1:]
        assert x[i, 0] == BOS  # every row starts a conversation: none is ever cut
    # exact resume: the state before a batch gives that batch again
    r2 = ChatReader(convs, batch_size=4, seq_len=32, seed=1)
    r2.next_batch()
    state = r2.state_dict()
    want = r2.next_batch()
    r3 = ChatReader(convs, batch_size=4, seq_len=32, seed=1)
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
    assert conv[0] == {"role": "user", "content": row["question"]}
    assert conv[1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether "
                                  "in April and May.\nThe answer is 72.")
    import tasks
    assert tasks.check("add", conv[1]["content"], "72")  # the task checkers read it
    render_conversation(conv)
