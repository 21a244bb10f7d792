"""Bad input through the real `memo` entry point: one clear line, non-zero exit, nothing damaged."""

import json


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
    assert "--base-model 'no/such-model'" in one_error_line(res)


def test_config_errors_name_the_field(tmp_path):
    res = run_cli("train", "--domain", "d", "--reflections", str(tmp_path), "--epochs", "0")
    assert "--epochs 0" in one_error_line(res)
    res = run_cli("train", "--domain", "d", "--reflections", str(tmp_path), "--set", "lerning_rate=1")
    assert "unknown key(s) lerning_rate" in one_error_line(res)
    res = run_cli("train", "--domain", "d")
    assert "exactly one of --reflections" in one_error_line(res)


def test_unknown_domain_for_promote_and_status_leaves_registry_alone(memo_home):
    res = run_cli("promote", "--domain", "ghost", "--to", "champion")
    assert "unknown domain" in one_error_line(res)
    res = run_cli("status", "--domain", "ghost")
    assert "unknown domain" in one_error_line(res)
    res = run_cli("status", "--json")
    assert res.returncode == 0
    assert "ghost" not in [d["domain"] for d in json.loads(res.stdout)["domains"]]
