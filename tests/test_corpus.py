import json

import pytest
from memo.corpus import chunk_document, corpus_hash, load_documents, split_sentences
from memo.errors import MemoError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_fields_and_defaults(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "title": "A", "date": "2020-01-02", "text": "One. Two."},
                                           {"text": "No id here."}])
    docs = load_documents(f)
    assert [d.doc_id for d in docs] == ["a", "c-2"]
    assert docs[0].title == "A" and docs[0].doc_date == "2020-01-02"
    assert docs[1].source.endswith("c.jsonl:2")


def test_folder_of_text_files(tmp_path):
    (tmp_path / "Alpha_Report.md").write_text("Alpha is here.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "beta.txt").write_text("Beta is there.")
    (tmp_path / "ignored.csv").write_text("x")
    docs = load_documents(tmp_path)
    assert {d.doc_id for d in docs} == {"Alpha_Report", "sub/beta"}
    assert {d.title for d in docs} == {"Alpha Report", "beta"}


@pytest.mark.parametrize("content, expect", [
    ('{"text": "ok"}\n{"text": "broken"\n', "c.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"title": "no text"}\n', "c.jsonl:2: field 'text' is missing"),
    ('{"text": "ok"}\n[1, 2]\n', "c.jsonl:2: expected a JSON object"),
    ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "duplicate document id 'x'"),
    ("\n\n", "the corpus is empty"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expect):
    f = tmp_path / "c.jsonl"
    f.write_text(content)
    with pytest.raises(MemoError, match=expect.replace("(", r"\(").replace("[", r"\[")):
        load_documents(f)


def test_non_utf8_names_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MemoError, match=r"c.jsonl:2: not valid UTF-8"):
        load_documents(f)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(MemoError, match="no such file or folder"):
        load_documents(tmp_path / "nope.jsonl")
    with pytest.raises(MemoError, match="has no .txt/.md files"):
        load_documents(tmp_path)


def test_chunks_are_sentence_aligned_with_overlap():
    text = " ".join(f"Sentence number {i} has exactly seven words." for i in range(30))
    doc = {"doc_id": "d", "title": "T", "text": text, "doc_date": "", "source": "s"}
    chunks = list(chunk_document(doc, "demo", chunk_words=70, overlap=0.2))
    assert len(chunks) > 3
    for c in chunks:
        assert c["text"].startswith("Sentence number") and c["text"].endswith("words.")
        assert len(c["text"].split()) <= 70
        assert set(c) == {"domain", "doc_id", "chunk_id", "title", "text", "doc_date", "source", "sha256"}
    # consecutive chunks share their boundary sentences, and every sentence is covered
    first, second = split_sentences(chunks[0]["text"]), split_sentences(chunks[1]["text"])
    assert second[:2] == first[-2:]  # 20% of 70 words = two 7-word sentences
    covered = {s for c in chunks for s in split_sentences(c["text"])}
    assert covered == set(split_sentences(text))


def test_corpus_hash_changes_with_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "text": "Alpha."}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "1", "text": "Alpha!"}])
    assert corpus_hash(load_documents(a)) != corpus_hash(load_documents(b))
    assert corpus_hash(load_documents(a)) == corpus_hash(load_documents(a))
