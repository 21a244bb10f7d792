"""Bad input through the real `memo` entry point: one clear line, non-zero exit, nothing damaged; and
`memo serve` stopping cleanly on SIGTERM."""

import json
import pytest

from conftest import DEMO_CORPUS, run_cli


def one_error_line(res):
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert res.returncode == 2, res.stderr
    assert lines and lines[-1].startswith("memo "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]


def test_missing_corpus(tmp_path):
    res = run_cli("synthesize", "--domain", "d", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"))
    assert "none.jsonl: no such file or folder" in one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "The Orrin Lab was founded in 1990."}\n{"text": oops}\n')
    res = run_cli("train", "--domain", "d", "--corpus", str(bad))
    assert f"{bad}:2: malformed JSON" in one_error_line(res)


def test_non_utf8_file_in_a_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"fine\nbad \xff byte\n")
    res = run_cli("synthesize", "--domain", "d", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "o"))
    assert "a.txt:2: not valid UTF-8" in one_error_line(res)


def test_bad_domain_and_unknown_base_model(tmp_path):
    res = run_cli("synthesize", "--domain", "Bad Domain!", "--corpus", str(DEMO_CORPUS), "--out", str(tmp_path))
    assert "--domain 'Bad Domain!'" in one_error_line(res)
    refl = tmp_path / "r"
    refl.mkdir()
    import pandas as pd

    pd.DataFrame({"question": ["q?"], "answer": ["a"], "step": ["direct"]}).to_parquet(refl / "reflections.parquet")
    res = run_cli("train", "--domain", "d", "--reflections", str(refl), "--base-model", "no/such-model")
    line = one_error_line(res)
    assert "--base-model 'no/such-model'" in line and "`hf download no/such-model`" in line and "HF_HOME=" in line


def test_config_errors_name_the_field(tmp_path):
    res = run_cli("train", "--domain", "d", "--reflections", str(tmp_path), "--epochs", "0")
    assert "--epochs 0" in one_error_line(res)
    res = run_cli("train", "--domain", "d", "--reflections", str(tmp_path), "--set", "lerning_rate=1")
    assert "unknown key(s) lerning_rate" in one_error_line(res)
    res = run_cli("train", "--domain", "d")
    assert "exactly one of --reflections" in one_error_line(res)


def test_check_refuses_executive_settings_the_served_answer_would_ignore():
    # The router's executive runs with its serve config: a --set here would silently change nothing.
    res = run_cli("check", "--domain", "demo", "--set", "executive.chain=rewrite")
    assert "executive settings chain: the router's MeMo answer uses its serve config's" in one_error_line(res)
    assert "--memo-answer local" in res.stderr


def test_unknown_domain_for_promote_and_status_leaves_registry_alone(memo_home):
    res = run_cli("promote", "--domain", "ghost", "--to", "champion")
    assert "unknown domain" in one_error_line(res)
    res = run_cli("status", "--domain", "ghost")
    assert "unknown domain" in one_error_line(res)
    res = run_cli("status", "--json")
    assert res.returncode == 0
    assert "ghost" not in [d["domain"] for d in json.loads(res.stdout)["domains"]]


def test_flags_help_and_recipes_come_from_the_config_fields():
    """Every config field is a flag with its doc as help (no hand-written flag list), a job's stage
    sections reach their stage (`memo train --corpus ... --synthesize.chunk-words 200`), and the shipped
    recipes in configs/ validate against the fields (they cannot drift)."""
    from conftest import REPO
    from memo.cli import build_parser, parse, section
    from memo.config import SynthesizeConfig, TrainConfig

    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for name, f in TrainConfig.model_fields.items():
        if name in helps:
            assert f.description.replace("%", "%%") in helps[name]
    assert set(TrainConfig.model_fields) <= set(helps) and "synthesize.chunk_words" in helps

    _, cfg, sections, args = parse(["train", "--domain", "d", "--corpus", str(DEMO_CORPUS),
                                    "--synthesize.chunk-words", "200", "--set", "abstain_ratio=0.1"])
    synth = section(args, sections, SynthesizeConfig, "synthesize", domain=cfg.domain, corpus=cfg.corpus)
    assert synth.chunk_words == 200 and synth.abstain_ratio == 0.1

    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        _, cfg, sections, args = parse(["train", "--domain", "d", "--corpus", str(DEMO_CORPUS),
                                        "--config", str(recipe)])
        section(args, sections, SynthesizeConfig, "synthesize", domain="d", corpus=str(DEMO_CORPUS))


def test_a_setting_two_sections_share_must_say_which(tmp_path):
    res = run_cli("eval", "--benchmark", "musique", "--data", str(DEMO_CORPUS), "--out", str(tmp_path / "o"),
                  "--set", "workers=2")
    assert "in both train and synthesize: write train.workers=" in one_error_line(res)


@pytest.mark.slow
def test_memo_serve_stops_cleanly_on_sigterm_even_with_sigint_ignored(tmp_path):
    """What `make demo`'s trap and process supervisors do: TERM (a script's background job starts with
    SIGINT ignored, so INT would never arrive). The router must shut Serve down and exit 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MEMO_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "memo.cli", "serve", "--port", str(port), "--no-serve-executive"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "memo router stopped" in out, out[-2000:]


def test_chunks_an_llm_generator_would_reject_are_a_config_error():
    """chunk_words above max_chunk_tokens made every book-sized chunk a too_long reject (the GPU recipes did):
    now an error naming both fields, before anything runs."""
    from memo.config import SynthesizeConfig, build_config
    from memo.errors import MemoError

    with pytest.raises(MemoError, match="chunk_words=6400 > max_chunk_tokens=3000"):
        build_config(SynthesizeConfig, {"domain": "d", "corpus": "c", "generator": "vllm", "model": "m",
                                        "chunk_words": 6400})
    assert build_config(SynthesizeConfig, {"domain": "d", "corpus": "c", "chunk_words": 6400}).generator == "rules"


def test_the_gpu_extra_pins_the_vllm_that_ray_serve_llm_is_built_against():
    """An unpinned vllm resolved to a newer one than ray.serve.llm supports: the extra must pin the version
    the installed Ray's own `llm` extra pins (so a Ray upgrade that moves it fails here, not on a cluster)."""
    import re
    import tomllib
    from importlib.metadata import requires

    from conftest import REPO

    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    ray_pin = next(re.search(r"==([\w.]+)", r)[1] for r in requires("ray") if r.startswith("vllm") and "llm" in r)
    assert [g for g in gpu if g.startswith("vllm")] == [f"vllm=={ray_pin}"]
