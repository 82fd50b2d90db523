"""Instruction data (``data.format`` "chat" / "prompt_completion"): completion-only labels equal to a hand-masked
reference, packed examples that never attend to each other (per-example losses and gradients as unpacked),
the loss weights counting completion tokens only, and chat data that cannot be rendered refused before
launch with the dotted key and the fix."""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ds_hexamoe import cli
from ds_hexamoe.config import ConfigError
from ds_hexamoe.recipes import load_recipe
from ds_hexamoe.tasks import build_dataset, build_model, build_tokenizer
from ds_hexamoe.hetero.batching import count_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(REPO, "ds_hexamoe", "data", "checkpoints", "mixtral-tiny")
EOS = "<|endoftext|>"
CHATS = [
    [{"role": "user", "content": "What is 12 + 5?"}, {"role": "assistant", "content": "17"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse stone."},
     {"role": "assistant", "content": "enots"}, {"role": "user", "content": "And tiger?"},
     {"role": "assistant", "content": "regit"}],
    [{"role": "user", "content": "Write lemon in capitals."}, {"role": "assistant", "content": "LEMON"}],
    [{"role": "user", "content": "How many letters are in castle?"}, {"role": "assistant", "content": "6"}],
]


def _write(root, records, name="train.jsonl") -> str:
    path = os.path.join(str(root), name)
    with open(path, "w") as fh:
        fh.writelines(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    return path


def _recipe(root, records, **data) -> dict:
    spec = {"train_files": [_write(root, records)], "format": "chat", "chat_template": "simple", "seq_len": 128,
            "packing": False, "cache_dir": os.path.join(str(root), "hf-cache"), **data}
    # no router loss: out.loss is the language-model loss alone
    return {"model": {"path": CKPT, "config": {"output_router_logits": False}}, "data": spec,
            "training": {"output_dir": os.path.join(str(root), "run")}}


def _built(recipe: dict):
    r = load_recipe(recipe)
    tok = build_tokenizer(r)
    return r, tok, build_dataset(r, tok)


def _hand(tok, pieces) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and labels tokenized piece by piece: (text, learn) pairs, labels -100 where not learned."""
    ids, labels = [], []
    for text, learn in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if learn else [-100] * len(t)
    return torch.tensor([ids]), torch.tensor([labels])


def _model(r):
    torch.manual_seed(0)
    return build_model(r).eval()


def test_completion_only_loss_equals_hand_masked_reference(tmp_path):
    r, tok, data = _built(_recipe(tmp_path, [{"messages": c} for c in CHATS[:2]]))
    model = _model(r)
    # the built-in "simple" template, written out by hand
    hand = [[("<|user|>\nWhat is 12 + 5?\n<|assistant|>\n", False), ("17" + EOS, True)],
            [("<|system|>\nBe brief.\n<|user|>\nReverse stone.\n<|assistant|>\n", False), ("enots" + EOS, True),
             ("<|user|>\nAnd tiger?\n<|assistant|>\n", False), ("regit" + EOS, True)]]
    for i, pieces in enumerate(hand):
        ids, labels = _hand(tok, pieces)
        batch = data.collate([data.train[i]])
        assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
            ref = F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100)
            got = model(**batch).loss
        torch.testing.assert_close(got, ref)
        assert count_tokens(batch["labels"]) == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t, learn in pieces if learn)

    # prompt/completion records: the completion and EOS are learned, the prompt is not
    r, tok, data = _built(_recipe(tmp_path, [{"prompt": "Q: 3 + 4 =", "completion": " 7"}], format="prompt_completion",
                                  chat_template=None))
    ids, labels = _hand(tok, [("Q: 3 + 4 =", False), (" 7" + EOS, True)])
    batch = data.collate([data.train[0]])
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)


def _per_token_ce(model, batch) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    lab = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="none").view(lab.shape)


def test_packed_examples_match_unpacked_losses_and_gradients(tmp_path):
    records = [{"messages": c} for c in CHATS]
    r, tok, unpacked = _built(_recipe(tmp_path, records))
    _, _, packed = _built(_recipe(tmp_path, records, packing=True, seq_len=128))
    assert len(packed.train) < len(unpacked.train)  # several examples share a row
    model = _model(r)

    def losses_and_grads(batches):
        model.zero_grad()
        per_example, total = [], 0
        for batch in batches:
            ce = _per_token_ce(model, batch)
            pos = batch["position_ids"][:, 1:]
            seg = (batch["position_ids"] == 0).cumsum(1)[:, 1:]  # example index within its row
            for row in range(ce.shape[0]):
                for s in seg[row].unique():
                    sel = (seg[row] == s) & (batch["labels"][row, 1:] != -100) & (pos[row] > 0)
                    if sel.any():
                        per_example.append(ce[row][sel].sum())
            total = total + ce.sum()
        total.backward()
        return torch.stack(per_example).detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}

    alone, g_alone = losses_and_grads([unpacked.collate([unpacked.train[i]]) for i in range(len(unpacked.train))])
    rows = packed.collate([packed.train[i] for i in range(len(packed.train))])
    together, g_together = losses_and_grads([rows])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert g_alone.keys() == g_together.keys()
    for n in g_alone:
        torch.testing.assert_close(g_together[n], g_alone[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # the check can fail: the same rows without restarted positions (one long sequence) give other losses
    with torch.no_grad():
        crossed = _per_token_ce(model, {**rows, "position_ids": torch.arange(rows["input_ids"].shape[1]).expand_as(
            rows["input_ids"])})
    assert not torch.allclose(crossed.sum(), together.sum(), rtol=1e-3)


def test_loss_weights_count_completion_tokens_across_ranks(tmp_path):
    """Two ranks' micro-batches with unlike completion counts: each rank's mean loss weighted the way the
    step weighs uneven shares (``loss_scale`` of :func:`~ds_hexamoe.hetero.batching.count_tokens`) averages to the mean over every
    completion token of the union."""
    from ds_hexamoe.hetero import loss_scale

    r, tok, data = _built(_recipe(tmp_path, [{"messages": c} for c in CHATS]))
    model = _model(r)
    shares = [data.collate([data.train[0]]), data.collate([data.train[i] for i in (1, 2, 3)])]
    counts = [count_tokens(b["labels"]) for b in shares]
    assert counts[0] != counts[1]
    with torch.no_grad():
        means = [model(**b).loss for b in shares]
        union = torch.cat([_per_token_ce(model, b)[b["labels"][:, 1:] != -100] for b in shares])
    world = len(shares)
    averaged = sum(m * loss_scale(n, sum(counts), world) for m, n in zip(means, counts)) / world
    torch.testing.assert_close(averaged, union.mean())


def test_worker_refuses_a_bad_record_past_the_checked_head(tmp_path, monkeypatch):
    from ds_hexamoe.recipes import instruct

    records = [{"messages": c} for c in CHATS] + [{"messages": [{"role": "user"}]}]
    monkeypatch.setattr(instruct, "_SCAN_BYTES", 10)  # the pre-launch check sees only the first record
    r = load_recipe(_recipe(tmp_path, records))
    with pytest.raises(ConfigError, match=r"record 4 of the train data message 0 .* lacks a \"role\" or a text"):
        build_dataset(r, build_tokenizer(r))


# the message count first: each turn changes the text before it
PREFIX_CHANGING = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


# (id, changes of "data" (and the "hexamoe" section), records (None: good ones), the error's start, a fragment of the fix)
REFUSED = [
    # the shipped tokenizer has no chat template
    ("no-template", {"chat_template": None}, None, "data.chat_template: the tokenizer", "set data.chat_template"),
    ("message-without-role", {}, [CHATS[0], [{"content": "hi"}, {"role": "assistant", "content": "x"}]],
     "data.train_files: ", 'every message needs {"role": "...", "content": "..."}'),
    ("message-without-content", {}, [[{"role": "user"}, {"role": "assistant", "content": "x"}]],
     "data.train_files: ", "line 1 message 0"),
    ("record-without-field", {}, [CHATS[0], {"conversation": CHATS[1]}], "data.messages_field: ",
     "has no 'messages' field"),
    ("no-assistant", {}, [[{"role": "user", "content": "hi"}]], "data.train_files: ",
     "data.completion_only_loss false"),
    ("json-text-field-holds-messages", {"format": "json", "text_field": "messages", "chat_template": None}, None,
     "data.text_field: 'messages' of ", 'set data.format "chat"'),
    ("template-without-chat", {"format": "json", "text_field": "messages"}, None, "data.chat_template: only used",
     'format to "chat"'),
    ("unknown-builtin", {"chat_template": "fancy"}, None, "data.chat_template: 'fancy' is neither", "Jinja"),
    ("template-not-a-prefix", {"chat_template": PREFIX_CHANGING}, None,
     "data.chat_template: the template does not render", '"simple"'),
    ("packed-with-zebra", {"packing": True, "hexamoe": {"zebra": {"enabled": "auto"}, "profile": "declared",
                                                        "devices": [{"name": "cpu"}, {"name": "cpu", "slowdown": 2}]}},
     None, "data.packing: packed 'chat' examples", "data.packing false"),
    ("text-files", {"train_files": [os.path.join(REPO, "ds_hexamoe", "data", "corpus", "GPL-3.txt")]}, None,
     'data.format: "chat" reads JSON lines', "GPL-3.txt"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_chat_data_that_cannot_be_rendered_is_refused_before_launch(tmp_path, capsys, case):
    _, changes, records, start, fix = case
    recs = [{"messages": c} if isinstance(c, list) else c for c in (records or CHATS)]
    recipe = _recipe(tmp_path, recs)
    recipe["data"].update({k: v for k, v in changes.items() if k != "hexamoe"})
    recipe["hexamoe"] = changes.get("hexamoe")
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    for cmd in (["validate", str(path)], ["train", str(path), "--dry-run"]):
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err
        assert start in err and fix in err, err
    assert not os.path.exists(recipe["training"]["output_dir"])


def test_tokenizer_build_is_refused_with_instruction_data(tmp_path):
    recipe = _recipe(tmp_path, [{"messages": c} for c in CHATS])
    recipe["model"] = {"config": {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}}
    recipe["tokenizer"] = {"build": {"vocab_size": 300}}
    with pytest.raises(ConfigError, match=r'^tokenizer.build: data.format "chat" fine-tunes'):
        load_recipe(recipe)


def test_shipped_sft_recipe_validates_and_its_data_is_the_script_output(tmp_path):
    r = load_recipe(os.path.join(REPO, "recipes", "mixtral-tiny-sft.json"))
    assert r.data.format == "chat" and r.data.completion_only_loss and r.hexamoe_config.profile == "declared"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_chat_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in ("train.jsonl", "validation.jsonl"):
        assert filecmp.cmp(tmp_path / name, os.path.join(REPO, "ds_hexamoe", "data", "chat", name), shallow=False)
