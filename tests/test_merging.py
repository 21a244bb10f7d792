"""`memo merge`: the task-vector arithmetic on known tensors, merged folders against their root base,
and the command on a real MLflow registry (lineage tags, `memo status`, the one-line errors that
register nothing). Serving a merged version is in test_serving (its `harbour` domain is a merge)."""

import json

import pytest
from conftest import run_cli


def test_ties_on_known_tensors_gives_the_known_result():
    import torch
    from memo.merging import merge_deltas

    d1 = torch.tensor([1.0, -2.0, 3.0, -0.5])
    d2 = torch.tensor([2.0, 1.5, -1.0, -0.1])
    # density 0.5 keeps the 2 largest of each: [0,-2,3,0] and [2,1.5,0,0]; the elected sign per entry is
    # that of the sum (+,-,+,+); entries of the other sign drop out; the rest are averaged per entry
    assert merge_deltas([d1, d2], "ties", [1.0, 1.0], 0.5).tolist() == [2.0, -2.0, 3.0, 0.0]
    assert torch.allclose(merge_deltas([d1, d2], "task_arithmetic", [1.0, 0.5], 1.0),
                          torch.tensor([2.0, -1.25, 2.5, -0.55]))
    assert torch.allclose(merge_deltas([d1, d2], "linear", [3.0, 1.0], 1.0), 0.75 * d1 + 0.25 * d2)


@pytest.mark.parametrize("method,weights,density", [("linear", [1.0, 1.0], 0.3), ("task_arithmetic", [0.5, 0.5], 0.3),
                                                    ("ties", [1.0, 1.0], 1.0)])
def test_a_merge_of_a_memory_with_itself_returns_it(method, weights, density):
    import torch
    from memo.merging import merge_deltas

    d = torch.randn(64, 32)
    assert torch.allclose(merge_deltas([d, d], method, weights, density), d, atol=1e-6)


def _memory(base, out, scale, seed):
    """A 'memory': the base model with a random task vector added to every weight matrix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(scale * torch.randn_like(p))
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_merged_folders_take_task_vectors_against_the_root_base(tmp_path, tiny_model):
    from pathlib import Path

    import torch
    from memo.merging import merge_folders

    base = Path(tiny_model)
    a, b = _memory(base, tmp_path / "a", 0.02, 1), _memory(base, tmp_path / "b", 0.02, 2)
    merge_folders(base, [a, a], tmp_path / "self", "linear", [1.0, 1.0], 0.3, 0)
    for k, v in _weights(a).items():
        assert torch.allclose(_weights(tmp_path / "self")[k], v, atol=1e-6), k
    # TIES 0.3 of a memory with itself keeps the largest 30% of its task vector, over the BASE: relative to
    # the first memory (the authors' scripts) the result would be the memory itself
    stats = merge_folders(base, [a, a], tmp_path / "ties", "ties", [1.0, 1.0], 0.3, 0)
    w, wa, wb = _weights(tmp_path / "ties"), _weights(a), _weights(base)
    name = "model.layers.0.mlp.up_proj.weight"
    kept = (w[name] != wb[name]).float().mean().item()
    assert 0.29 <= kept <= 0.31 and torch.equal(w[name] != wb[name], (w[name] - wa[name]).abs() < 1e-6)
    assert stats["tensors_changed"] < stats["tensors"]  # the norms were never touched: taken as they are
    # two memories: TIES lands between them where they agree; the config and tokenizer come along
    merge_folders(base, [a, b], tmp_path / "ab", "ties", [1.0, 1.0], 0.3, 0)
    assert (tmp_path / "ab" / "tokenizer.json").exists() and json.loads((tmp_path / "ab" / "config.json").read_text())
    # DARE draws its drop masks from the seed: the same seed gives the same memory, another seed another
    for seed, out in ((0, "d0"), (0, "d0b"), (1, "d1")):
        merge_folders(base, [a, b], tmp_path / out, "dare_ties", [1.0, 1.0], 0.3, seed)
    assert torch.equal(_weights(tmp_path / "d0")[name], _weights(tmp_path / "d0b")[name])
    assert not torch.equal(_weights(tmp_path / "d0")[name], _weights(tmp_path / "d1")[name])


def _registered(domain, folder, root_base, reflections=None, heldout=()):
    """Register `folder` as a trained memory of `root_base` (its lineage manifest, held-out rewordings)."""
    from memo import registry

    (folder / "memo_manifest.json").write_text(json.dumps({
        "domain": domain, "root_base_model": str(root_base), "base_model": str(root_base),
        "reflections": str(reflections or ""), "reflection_sources": [str(reflections or "")]}))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    run_id = registry.start_run(domain, "train", {})
    return registry.register_memory(domain, folder, run_id, {"base_model": str(root_base)}, "champion")


@pytest.mark.slow
def test_memo_merge_registers_a_candidate_with_its_lineage_and_refuses_bad_inputs(tmp_path, tiny_model, capsys):
    import pandas as pd
    from memo import registry
    from memo.cli import main
    from memo.synthesis.schema import COLUMNS
    from tiny import build_tiny_model
    from transformers import AutoTokenizer

    refl = tmp_path / "refl"
    refl.mkdir()
    pd.DataFrame([{"id": "r1", "domain": "ma", "step": "direct", "question": "Who keeps the light?",
                   "answer": "Mara Quill.", "source_chunk_ids": ["x#0"], "generator": "rules", "verified": True}],
                 columns=COLUMNS).to_parquet(refl / "reflections.parquet")
    held = [{"question": "The light is kept by whom?", "answer": "Mara Quill"}]
    va = _registered("ma", _memory(tiny_model, tmp_path / "a", 0.02, 1), tiny_model, refl, held)
    vb = _registered("mb", _memory(tiny_model, tmp_path / "b", 0.02, 2), tiny_model)
    other = build_tiny_model(tmp_path / "otherbase", vocab_size=300, seed=3)
    _registered("mc", _memory(other, tmp_path / "c", 0.02, 3), other)
    d = _memory(tiny_model, tmp_path / "d", 0.02, 4)  # the same base, another tokenizer
    AutoTokenizer.from_pretrained(other).save_pretrained(d)
    _registered("md", d, tiny_model)

    args = ["merge", "--domain", "mab", "--from", f"models:/memo-ma/{va}", "models:/memo-mb@champion",
            "--method", "ties", "--density", "0.3", "--weights", "1,0.5", "--set", "eval_sample=1"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert registry.resolve_version("mab", "candidate") == "1"
    mv = registry.client().get_model_version("memo-mab", "1")
    assert json.loads(mv.tags["memo.merge_inputs"]) == [
        {"uri": f"models:/memo-ma/{va}", "domain": "ma", "version": va, "run_id": registry.client().get_model_version("memo-ma", va).run_id},
        {"uri": "models:/memo-mb@champion", "domain": "mb", "version": vb,
         "run_id": registry.client().get_model_version("memo-mb", vb).run_id}]
    assert mv.tags["memo.merge_method"] == "ties" and mv.tags["memo.merge_density"] == "0.3"
    assert json.loads(mv.tags["memo.merge_weights"]) == [1.0, 0.5] and mv.tags["memo.base_model"] == tiny_model
    folder = registry.download_version("mab", "1")
    manifest = json.loads((folder / "memo_manifest.json").read_text())
    assert manifest["merge"]["method"] == "ties" and manifest["root_base_model"] == tiny_model
    # input 0's own checks, asked of it and of the merge: its recital and its held-out rewording
    m = manifest["metrics"]
    assert {"input0.train_recall", "merged0.train_recall", "input0.heldout_contains", "merged0.heldout_contains"} <= set(m)
    assert (folder / "heldout.jsonl").read_text().count("\n") == 1  # the gate asks the inputs' held-out rows
    status = run_cli("status", "--domain", "mab")
    assert status.returncode == 0 and f"merged from memo-ma/{va} + memo-mb/{vb} (ties" in status.stdout

    # bad inputs: one line naming the argument, exit 2, nothing registered
    for bad, message in (
            (["--from", "models:/memo-ma/9", "models:/memo-mb/1"], "--from models:/memo-ma/9: no such version"),
            (["--from", "models:/memo-ma/1", "models:/memo-mc/1"], "--from models:/memo-mc/1: root base"),
            (["--from", "models:/memo-ma/1", "models:/memo-md/1"], "--from models:/memo-md/1: its tokenizer differs"),
            (["--from", "models:/memo-ma/1", "models:/memo-mb/1", "--density", "0"], "--density 0: use more than 0"),
            (["--from", "models:/memo-ma/1", "models:/memo-mb/1", "--density", "1.5"], "--density 1.5: use at most 1"),
            (["--from", "models:/memo-ma/1", "models:/memo-mb/1", "--weights", "1,1,1"], "weights: 3 given for 2"),
            (["--from", "models:/memo-ma/1"], "give two or more versions"),
            (["--from", "models:/memo-ma/1", "models:/memo-mb/1", "--alias", "champion"], "starts as a candidate")):
        # the real entry point, in this process (a subprocess each would cost ~5 s of start-up)
        assert main(["merge", "--domain", "mab", *bad]) == 2, bad
        err = capsys.readouterr().err
        # (this process' first MLflow store may log its set-up lines first: the command's own line is the last)
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err, (bad, err)
    assert [str(v.version) for v in registry.client().search_model_versions("name='memo-mab'")] == ["1"]
