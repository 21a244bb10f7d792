import pandas as pd
import pytest
from memo.errors import MemoError
from memo.inference import check_chat_template, memory_messages, prompt_ids
from memo.text import normalize_answer
from memo.training.data import (
    IGNORE,
    encode_example,
    epoch_batches,
    tokenize_reflections,
)
from memo.training.recipe import default_schedule, resolve_precision


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(tok):
    q, a = "Who founded the Halvenmere Cooperative?", "Ysolde Marrowfen founded the Halvenmere Cooperative."
    ids, labels = encode_example(tok, q, a)
    prompt = prompt_ids(tok, memory_messages(q))
    assert ids[: len(prompt)] == prompt  # byte-identical to the inference prompt
    for i, (tid, lab) in enumerate(zip(ids, labels)):
        if i < len(prompt):
            assert lab == IGNORE, f"prompt token {i} ({tok.decode([tid])!r}) carries loss"
        else:
            assert lab == tid, f"answer token {i} ({tok.decode([tid])!r}) has no loss"
    assert tok.decode([t for t, l in zip(ids, labels) if l != IGNORE], skip_special_tokens=True) == a
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # it learns to stop


def test_over_long_examples_are_dropped_and_counted(tok):
    df = pd.DataFrame({"question": ["short?", "long?"], "answer": ["yes", "word " * 300]})
    data, dropped = tokenize_reflections(df, tok, max_seq_len=64)
    assert len(data) == 1 and dropped == 1


def test_epoch_batches_keep_every_row_once_and_pad_little():
    lengths = [5, 50, 7, 49, 6, 48, 8, 47, 9, 30, 31] * 8
    facts = [[str(i)] for i in range(len(lengths))]
    b = epoch_batches(lengths, facts, batch_size=4, seed=0)
    assert len(b) == 22 and sorted(i for batch in b for i in batch) == list(range(len(lengths)))
    padding = sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in b)
    naive = [lengths[i:i + 4] for i in range(0, len(lengths), 4)]
    naive_padding = sum(max(g) * len(g) - sum(g) for g in naive)
    assert padding < naive_padding / 2  # similar lengths together: far less padding than file order


def test_epoch_batches_keep_a_facts_wordings_apart_and_reshuffle_every_epoch():
    """Five wordings of each of 12 facts (same length: the old length grouping put them side by side):
    no micro-batch holds two wordings of one fact, and each epoch draws other neighbours."""
    facts = [[f"fact{k}"] for k in range(12) for _ in range(5)]
    lengths = [20 + k for k in range(12) for _ in range(5)]
    epochs = [epoch_batches(lengths, facts, batch_size=8, seed=s) for s in range(3)]
    for b in epochs:
        assert all(len({facts[i][0] for i in g}) == len(g) for g in b)
        assert sorted(i for g in b for i in g) == list(range(60))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == epoch_batches(lengths, facts, batch_size=8, seed=0)  # a resumed run replays it


def test_packing_never_puts_two_wordings_of_a_fact_in_one_row():
    from memo.training.data import pack_examples

    data = pd.DataFrame({"input_ids": [[1] * 10] * 6, "labels": [[1] * 10] * 6,
                         "facts": [["a"], ["a"], ["a"], ["b"], ["b"], ["c"]]})
    packed = pack_examples(data, max_seq_len=100)  # room for all six in one row
    assert sorted(packed.examples) == [1, 2, 3] and all(len(set(f)) == n for f, n in zip(packed.facts, packed.examples))


def test_missing_chat_template_is_a_clear_error(tmp_path):
    from tiny import build_tiny_model
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path / "m", chat_template=False)
    with pytest.raises(MemoError, match="no chat template"):
        check_chat_template(AutoTokenizer.from_pretrained(path), "--base-model x")


def test_defaults_follow_model_and_data_size():
    assert default_schedule(135e6, 300)[:2] == (6, 3e-4)
    assert default_schedule(630e6, 300)[:2] == (6, 1e-4)  # the dequantized 0.5B: 3e-4 spiked its loss
    assert default_schedule(14e9, 600_000)[:2] == (3, 2e-5)  # the paper's recipe at the paper's scale
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")


def test_normalize_answer():
    assert normalize_answer("The  Vessamere Lantern!") == "vessamere lantern"


def test_answer_only_logits_give_the_models_own_loss(tiny_model, tok):
    import torch
    from memo.training.data import collate
    from memo.training.loss import answer_loss
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    pairs = [("Who leads the Ketterline Lab?", "Wenna Ostrocliff leads the Ketterline Lab."),
             ("Where?", "Velmora."), ("How many staff does the Glimmerfield Division have?", "138.")]
    enc = [encode_example(tok, q, a) for q, a in pairs]
    ids, labels, mask = collate([e[0] for e in enc], [e[1] for e in enc], tok.pad_token_id)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = answer_loss(model, ids, labels, mask)
    assert torch.allclose(got, expected, atol=1e-5)
    got.backward()
    assert model.lm_head.weight.grad is not None or model.get_input_embeddings().weight.grad is not None


def test_degenerate_repetition_is_trimmed_and_normal_answers_are_untouched():
    from memo.inference import trim_repetition

    assert trim_repetition("Wenna Ostrocliff.Wenna Ostrocliff.Wenna Ostrocliff.Wenna Ostr") == "Wenna Ostrocliff."
    for ok in ("The Ketterline Lab is based in Velmora. It operates the Thistlewire Relay.", "1998", ""):
        assert trim_repetition(ok) == ok
