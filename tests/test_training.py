"""Production training options: gradient accumulation, LoRA (merged and adapter exports), continual
updates with replay and lineage, and the errors that must come before any worker starts."""

import pandas as pd
import pytest
from conftest import DEMO_CORPUS
from memo.errors import MemoError


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(tiny_model, tok):
    """Two micro-batches of different lengths and answer-token counts, accumulated, must give the same
    gradient as all four examples in one batch (the loss is normalised by the step's token count)."""
    import torch
    from memo.training.data import collate, encode_example
    from memo.training.loss import accumulation_step
    from transformers import AutoModelForCausalLM

    pairs = [("Who leads the Ketterline Lab?", "Wenna Ostrocliff leads the Ketterline Lab."),
             ("Where is it?", "Velmora."),
             ("When did the Vessamere Lantern enter production?", "The Vessamere Lantern entered production in 1998."),
             ("How many?", "138 staff members work in the Glimmerfield Division, based in Skarreth Point.")]
    enc = [encode_example(tok, q, a) for q, a in pairs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    accumulation_step(model, [collate(*zip(*enc), pad)])
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    loss_big = accumulation_step(model, [collate(*zip(*enc), pad)])[0]
    model.zero_grad(set_to_none=True)
    halves = [collate(*zip(*enc[:2]), pad), collate(*zip(*enc[2:]), pad)]
    loss_acc, tokens = accumulation_step(model, halves)
    acc = _grads(model)
    assert big.keys() == acc.keys() and big
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6, msg=n)
    # a micro-batch repeated with weight zero (an FSDP rank's filler in an epoch's last step) changes nothing
    model.zero_grad(set_to_none=True)
    loss_fill, tokens_fill = accumulation_step(model, halves + [halves[0]], live=2)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, big[n], rtol=1e-4, atol=1e-6, msg=n)
    assert loss_fill == pytest.approx(loss_acc) == pytest.approx(loss_big, rel=1e-5) and tokens_fill == tokens


def test_a_step_trains_the_same_examples_on_any_number_of_workers():
    """The epoch's micro-batches are dealt step by step: for 1, 2 or 4 workers, step s trains the same
    micro-batches (what lets a run resume on another number of workers), every rank runs as many forwards,
    and only fillers beyond `live` repeat one."""
    from memo.training.data import deal

    order = [[i, i + 100] for i in range(10)]  # 10 micro-batches, 4 per step: the last step has 2
    for world in (1, 2, 4):
        for step in range(3):
            dealt = [deal(order, step, 4, rank, world) for rank in range(world)]
            assert sorted(mb for mine, live in dealt for mb in mine[:live]) == order[step * 4:(step + 1) * 4]
            assert len({len(mine) for mine, _ in dealt}) == 1  # FSDP: the same number of forwards on every rank
    assert deal(order, 2, 4, 3, 4) == ([order[8]], 0)  # the 4th rank has nothing left in the last step


def test_packed_rows_give_each_example_its_own_loss(tiny_model, tok):
    """Examples packed into one row (position ids restarting per example, no attention mask) must give
    the same summed answer loss as the same examples padded in a batch: no example sees another."""
    import torch
    from memo.training.data import collate, encode_example, pack_examples
    from memo.training.loss import answer_loss
    from transformers import AutoModelForCausalLM

    pairs = [("Who leads the Ketterline Lab?", "Wenna Ostrocliff leads the Ketterline Lab."),
             ("Where is it?", "Velmora."),
             ("When did the Vessamere Lantern enter production?", "The Vessamere Lantern entered production in 1998.")]
    enc = [encode_example(tok, q, a) for q, a in pairs]
    data = pd.DataFrame({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})
    packed = pack_examples(data, max_seq_len=256)
    assert len(packed) == 1 and packed.examples[0] == 3
    assert sorted(packed.input_ids[0]) == sorted(t for e in enc for t in e[0])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ids, labels, mask = collate(data.input_ids, data.labels, pad)
        padded = answer_loss(model, ids, labels, mask, reduction="sum")
        ids, labels, mask, pos = collate(packed.input_ids, packed.labels, pad, packed.position_ids)
        one_row = answer_loss(model, ids, labels, mask, reduction="sum", position_ids=pos)
    torch.testing.assert_close(one_row, padded, rtol=1e-4, atol=1e-4)
    assert len(pack_examples(data, max_seq_len=max(map(len, data.input_ids)))) > 1  # a full row opens a new one


def test_decoder_layers_are_found_through_a_peft_wrapper(tiny_model):
    import torch
    from memo.training.loop import lora_adapter
    from memo.training.sharding import decoder_layers
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert len(decoder_layers(model)) == 2
    peft = get_peft_model(model, lora_adapter(4, 8, 0.0))
    assert len(decoder_layers(peft)) == 2
    trainable = {n.split(".")[-4] for n, p in peft.named_parameters() if p.requires_grad}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= trainable


@pytest.mark.parametrize("values, message", [
    ({"effective_batch_size": 12, "batch_size": 8}, "multiple of batch_size x workers"),
    ({"finetune": "qlora"}, "'full' or 'lora'"),
    ({"recipe": "fast"}, "'auto' or 'paper'"),
    ({"epochs": 0}, "use 1 or more"),
    ({"eval_questions": "/nope.jsonl"}, "no such file"),
    ({"max_epochs": 4}, "applies to select_on=heldout_recall only"),
    ({"select_on": "heldout_recall", "epochs": 4}, "set max_epochs"),
])
def test_training_config_errors_name_the_field(values, message):
    from memo.config import TrainConfig, build_config

    with pytest.raises(MemoError, match=message):
        build_config(TrainConfig, {"domain": "d", "reflections": "r", **values})


def test_epoch_selection_keeps_the_best_and_stops_after_patience_never_before_the_recipe():
    from memo.training.selection import EpochSelection

    s = EpochSelection(patience=2)
    assert [s.add(x) for x in (0.2, 0.5, 0.4, 0.3)] == [True, True, False, False]
    assert (s.best_epoch, s.best, s.stop) == (2, 0.5, True)
    tie = EpochSelection(patience=2)
    assert [tie.add(x) for x in (0.0, 0.0, 0.0)] == [True, True, True]  # a tie goes to the more trained epoch
    assert tie.best_epoch == 3 and not tie.stop
    floor = EpochSelection(patience=1, min_epochs=4)  # the recipe's epochs come first
    for x in (0.5, 0.1, 0.1):
        floor.add(x)
    assert floor.best_epoch == 1 and not floor.stop
    floor.add(0.1)
    assert floor.stop
    resumed = EpochSelection(2, [0.2, 0.5, 0.4])  # from a checkpoint's history
    assert resumed.best_epoch == 2 and not resumed.stop and EpochSelection(1).best_epoch == 0


def _build_sharded(rank: int, world: int, init_file: str, base: str, lora: bool, out: str) -> None:
    """One rank of test_a_sharded_model_...: build the model as the training loop does, save what it holds."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from memo.training.loop import lora_adapter
    from memo.training.sharding import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        if lora:
            from peft import get_peft_model

            model = build_model(base, torch.device("cpu"), world, lambda m: get_peft_model(m, lora_adapter(4, 8, 0.0)))
        else:
            model = build_model(base, torch.device("cpu"), world)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        if rank == 0:
            torch.save({"state": full, "logits": logits, "buffers": buffers}, out)
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_is_built_on_meta_and_filled_from_rank_zero(tiny_model, tmp_path):
    """2 ranks on gloo, as the training loop builds a LoRA run's model (the structure-changing case; full
    SFT is the same without the adapters): the weights and the adapters' initial values are rank 0's, the
    RoPE buffers that no state dict carries are right, and a forward pass gives the unsharded model's
    logits."""
    lora = True
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from memo.training.loop import lora_adapter

    out = tmp_path / "rank0.pt"
    mp.start_processes(_build_sharded, args=(2, str(tmp_path / "init"), tiny_model, lora, str(out)), nprocs=2,
                       start_method="spawn")
    got = torch.load(out, weights_only=False)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if lora:
        from peft import get_peft_model

        ref = get_peft_model(ref, lora_adapter(4, 8, 0.0))
    want = ref.state_dict()
    assert set(got["state"]) <= set(want) and len(got["state"]) >= len(want) - 1  # a tied head may be named once
    for name, w in got["state"].items():
        assert torch.equal(w, want[name]), name
    for name, b in ref.named_buffers():
        assert torch.equal(got["buffers"][name], b), name  # RoPE's inv_freq: not in any state dict
    with torch.no_grad():
        assert torch.allclose(got["logits"], ref(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits, atol=1e-5)


def test_paper_recipe_and_lora_rates():
    from memo.training.recipe import default_schedule

    assert default_schedule(135e6, 200, "paper")[:2] == (3, 2e-5)
    assert default_schedule(135e6, 200, "paper", "lora")[:2] == (3, 2e-4)
    assert default_schedule(14e9, 10**6)[:2] == (3, 2e-5)
    assert default_schedule(135e6, 200, "auto", "lora")[1] > default_schedule(135e6, 200)[1]


@pytest.fixture(scope="module")
def demo_reflections(ray_local, tmp_path_factory):
    from memo.config import SynthesizeConfig, build_config
    from memo.synthesis import synthesize

    out = tmp_path_factory.mktemp("refl")
    synthesize(build_config(SynthesizeConfig, {"domain": "cont", "corpus": str(DEMO_CORPUS), "out": str(out)}))
    return out


@pytest.mark.slow
def test_lora_continual_update_registers_a_child_with_replay_and_lineage(ray_local, tiny_model, demo_reflections,
                                                                         tmp_path):
    """v1: full SFT with 2-step gradient accumulation and the corpus' sentences mixed in (fact_text). v2:
    LoRA adapter fine-tuned from v1 (`--from candidate`) on new reflections plus a replay share of v1's;
    its lineage names v1 and it loads."""
    import torch
    from memo import registry
    from memo.config import TrainConfig, build_config
    from memo.models import load_model, read_manifest
    from memo.synthesis.schema import COLUMNS
    from memo.training import train

    base = {"domain": "cont", "base_model": tiny_model, "epochs": 1, "lr": 2e-3, "eval_sample": 2}
    v1 = train(build_config(TrainConfig, {**base, "reflections": str(demo_reflections), "batch_size": 4,
                                          "effective_batch_size": 8, "fact_text": "mixed"}))
    m1 = read_manifest(v1["model_dir"])
    assert m1["training_config"]["accumulation"] == 2
    assert v1["step"] == m1["training_config"]["total_steps"]
    # fact_text=mixed: the corpus' own sentences trained beside the reflections
    tc = m1["training_config"]
    assert tc["fact_statements"] >= 10 and tc["examples"] == m1["reflection_rows"] - m1["heldout_rows"] + tc["fact_statements"]

    new = tmp_path / "new"
    new.mkdir()
    rows = [{"id": f"n{i}", "domain": "cont", "step": "direct", "question": f"What did survey {i} of Lake Orrin count?",
             "answer": f"Survey {i} of Lake Orrin counted {40 + i} herons.", "source_chunk_ids": ["new#0"],
             "generator": "rules", "verified": True} for i in range(10)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(new / "reflections.parquet")

    v2 = train(build_config(TrainConfig, {**base, "reflections": str(new), "parent": "candidate",
                                          "finetune": "lora", "lora_r": 4, "lora_export": "adapter", "holdout_ratio": 0.0, "packing": True,
                                          "replay_ratio": 0.5}))
    m2 = read_manifest(v2["model_dir"])
    assert int(v2["version"]) == int(v1["version"]) + 1
    assert m2["parent_version"] == v1["version"] and m2["base_model"] == f"models:/memo-cont/{v1['version']}"
    assert m2["new_rows"] == 10 and m2["replay_rows"] == 5 and m2["reflection_rows"] == 15
    assert m2["reflection_sources"][1] == m1["reflections"]  # v1's data is the replay pool of later updates
    assert m2["root_base_model"] == tiny_model
    tags = registry.client().get_model_version("memo-cont", v2["version"]).tags
    assert tags["memo.parent_version"] == v1["version"] and tags["memo.finetune"] == "lora"

    folder = registry.download_version("cont", v2["version"])
    assert (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()
    child, _ = load_model(str(folder))
    parent, _ = load_model(str(registry.download_version("cont", v1["version"])))
    diffs = [float((a - b).abs().max()) for a, b in zip(child.state_dict().values(), parent.state_dict().values())]
    assert max(diffs) > 0  # the adapter changed the parent's weights
    assert all(torch.isfinite(p).all() for p in child.parameters())

    # `memo merge` takes the chain's LoRA child as full weights (adapter on its parent, on the root base):
    # the linear merge of v1 and v2 is their average, weight for weight
    from memo.config import MergeConfig
    from memo.merging import merge

    m = merge(MergeConfig(domain="cont-merged", inputs=[f"models:/memo-cont/{v1['version']}",
                                                        f"models:/memo-cont/{v2['version']}"],
                          method="linear", eval_sample=0))
    merged, _ = load_model(m["model_dir"])
    for name, w in merged.state_dict().items():
        assert torch.allclose(w, (parent.state_dict()[name] + child.state_dict()[name]) / 2, atol=1e-5), name
    assert read_manifest(m["model_dir"])["root_base_model"] == tiny_model


def test_continual_update_from_a_missing_alias_fails_before_training(ray_local, tiny_model, demo_reflections):
    from memo import registry
    from memo.config import TrainConfig, build_config
    from memo.training import train

    before = registry.list_domains()
    with pytest.raises(MemoError, match="no alias 'nope'|unknown domain"):
        train(build_config(TrainConfig, {"domain": "cont", "reflections": str(demo_reflections),
                                         "base_model": tiny_model, "parent": "nope"}))
    assert registry.list_domains() == before


def test_the_run_plan_crosses_the_ray_train_boundary_typed(tiny_model):
    """What the workers read is the TrainConfig itself plus the driver's derived values, validated again on
    the worker: a missing or misspelt key is an error there, not a silent default (the old hand-built dict)."""
    from memo.config import TrainConfig
    from memo.training.loop import RunPlan
    from pydantic import ValidationError

    plan = RunPlan(train=TrainConfig(domain="p", reflections="/r", lora_r=4), base_path=tiny_model, lr=1e-3,
                   epochs=2, precision="fp32", warmup_steps=0, steps_per_epoch=3, total_steps=6, micro_per_step=1,
                   lora_alpha=8, checkpoint_every=3, threads=1, pad_id=0, export_dtype="float32", rows_per_batch=8)
    sent = plan.model_dump()
    assert RunPlan.model_validate(sent) == plan and RunPlan.model_validate(sent).train.lora_r == 4
    for broken in ({k: v for k, v in sent.items() if k != "lr"}, {**sent, "learning_rate": 1e-3},
                   {**sent, "train": {**sent["train"], "lora_rank": 4}}):
        with pytest.raises(ValidationError):
            RunPlan.model_validate(broken)


def test_checkpoints_that_cannot_fit_on_the_disk_are_an_error_before_training(tmp_path):
    """A 0.5B full-SFT run filled the disk at its first checkpoint (then Ray Train retried it from scratch);
    now the run is refused up front, naming the sizes and the way out. LoRA needs far less."""
    from memo.training.placement import check_checkpoint_space

    runs = tmp_path / "ray_results" / "not-yet-created"
    with pytest.raises(MemoError, match=r"630M parameters \(full\) writes checkpoints of ~7.6 GB; .* need ~33 GB "
                                        r".* has 20 GB free: .* --finetune lora"):
        check_checkpoint_space(630e6, "full", runs, free_bytes=20 * 10**9)
    check_checkpoint_space(630e6, "lora", runs, free_bytes=20 * 10**9)  # weights only: ~13 GB
    check_checkpoint_space(135e6, "full", runs, free_bytes=20 * 10**9)  # the default memory: ~7 GB
    check_checkpoint_space(135e6, "full", runs)  # this disk, asked through the nearest existing folder


def test_an_interrupted_run_is_found_held_and_shared_by_any_divisor_of_its_micro_batches(tmp_path):
    """memo.training.resume: the newest run of the settings whose last checkpoint is a training state is
    continued (not a finished one, not one another driver holds); its micro-batches per step decide which
    numbers of workers can go on with it."""
    import os

    import torch
    from memo.training.resume import find_interrupted, hold

    def run(name, *checkpoints, age=0):
        d = tmp_path / name
        for ck, state in checkpoints:
            (d / ck).mkdir(parents=True)
            if state:
                torch.save(state, d / ck / "train_state.pt")
            else:
                (d / ck / "model").mkdir()  # the export: a finished run
        os.utime(d, (1e9 - age, 1e9 - age))
        return d

    state = {"step": 8, "world": 2, "micro_per_step": 4}
    run("memo-d-k-aaaa", ("checkpoint_2026-01-01_00-00-01", state), ("checkpoint_2026-01-01_00-00-02", None), age=0)
    run("memo-d-k-bbbb", ("checkpoint_2026-01-01_00-00-01", {**state, "step": 4}),
        ("checkpoint_2026-01-01_00-00-02", state), age=10)
    run("memo-d-other-cccc", ("checkpoint_2026-01-01_00-00-01", state), age=-10)  # other settings
    found = find_interrupted(tmp_path, "memo-d-k", workers=1)
    assert (found.name, found.step, found.world, found.micro_per_step, found.accum) == ("memo-d-k-bbbb", 8, 2, 4, 4)
    assert find_interrupted(tmp_path, "memo-d-k", workers=2) is None  # the first caller holds it
    found.lock.close()
    found = find_interrupted(tmp_path, "memo-d-k", workers=4)
    assert found.accum == 1
    found.lock.close()
    with pytest.raises(MemoError, match=r"--workers 3: the interrupted run memo-d-k-bbbb trains 4 micro-batch"):
        find_interrupted(tmp_path, "memo-d-k", workers=3)
    lock = hold(tmp_path / "memo-d-k-bbbb")  # another driver runs it: nothing to continue, nothing locked
    assert find_interrupted(tmp_path, "memo-d-k", workers=1) is None
    lock.close()
