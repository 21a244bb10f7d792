"""Corpus ingest and chunking.

Input contract (ARCHITECTURE.md): a JSONL file with one document per line (`text` required; `id`,
`title`, `date` optional) or a folder of .txt/.md files (file name = title). Documents are validated
up front in the driver, because only there can an error still name the file and line; chunking then
runs as a Ray Data `flat_map`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from memo.errors import MemoError, where

CORPUS_SUFFIXES = (".txt", ".md")
# Split after sentence-final punctuation followed by a capital, digit or quote; good enough for prose
# and it keeps abbreviations like "No. 5" mostly intact because the next token is a digit... rarely.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])")


@dataclass
class Document:
    doc_id: str
    title: str
    text: str
    doc_date: str
    source: str          # file[:line] the document came from, kept for provenance


@dataclass
class Chunk:
    domain: str
    doc_id: str
    chunk_id: str
    title: str
    text: str
    doc_date: str
    source: str
    sha256: str


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_documents(path: str | Path) -> list[Document]:
    """Read and validate a corpus; the first problem found is raised with its file and line."""
    p = Path(path)
    if not p.exists():
        raise MemoError(f"--corpus {p}: no such file or folder")
    docs = _load_folder(p) if p.is_dir() else _load_jsonl(p)
    if not docs:
        raise MemoError(f"--corpus {p}: the corpus is empty (no document with non-empty text)")
    seen: dict[str, str] = {}
    for d in docs:
        if d.doc_id in seen:
            raise MemoError(f"{d.source}: duplicate document id {d.doc_id!r} (first seen at {seen[d.doc_id]})")
        seen[d.doc_id] = d.source
    return docs


def _read_utf8(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MemoError(f"{where(p, line)}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _load_folder(p: Path) -> list[Document]:
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CORPUS_SUFFIXES)
    if not files:
        raise MemoError(f"--corpus {p}: the folder has no {'/'.join(CORPUS_SUFFIXES)} files")
    docs = []
    for f in files:
        text = _read_utf8(f).strip()
        if text:
            rel = f.relative_to(p).with_suffix("").as_posix()
            docs.append(Document(doc_id=rel, title=f.stem.replace("_", " "), text=text, doc_date="", source=str(f)))
    return docs


def read_jsonl(p: Path, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises naming the file and line."""
    for n, line in enumerate(_read_utf8(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemoError(f"{where(p, n)}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise MemoError(f"{where(p, n)}: expected {what}")
        yield n, row


def _load_jsonl(p: Path) -> list[Document]:
    docs = []
    for n, row in read_jsonl(p, "a JSON object with a 'text' field"):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise MemoError(f"{where(p, n)}: field 'text' is missing or empty")
        for key in ("id", "title", "date"):
            if key in row and not isinstance(row[key], (str, int)):
                raise MemoError(f"{where(p, n)}: field {key!r} must be a string")
        doc_id = str(row.get("id", f"{p.stem}-{n}"))
        docs.append(Document(doc_id=doc_id, title=str(row.get("title", doc_id)), text=text.strip(),
                             doc_date=str(row.get("date", "")), source=where(p, n)))
    return docs


def corpus_hash(docs: list[Document]) -> str:
    """Content hash of the corpus, recorded in every downstream artifact's lineage."""
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.doc_id):
        h.update(json.dumps([d.doc_id, d.title, d.doc_date, d.text]).encode("utf-8"))
    return h.hexdigest()


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def chunk_document(doc: dict, domain: str, chunk_words: int, overlap: float) -> Iterator[dict]:
    """Sentence-aligned chunks of about `chunk_words` words; consecutive chunks share ~`overlap` of them.

    Sentence alignment matters: synthesis works sentence by sentence, and a fact cut in half is lost.
    """
    sentences = split_sentences(doc["text"])
    start, index = 0, 0
    while start < len(sentences):
        end, words = start, 0
        while end < len(sentences) and (words == 0 or words + len(sentences[end].split()) <= chunk_words):
            words += len(sentences[end].split())
            end += 1
        text = " ".join(sentences[start:end])
        yield asdict(Chunk(domain=domain, doc_id=doc["doc_id"], chunk_id=f"{doc['doc_id']}#{index}",
                           title=doc["title"], text=text, doc_date=doc["doc_date"], source=doc["source"],
                           sha256=sha256_text(text)))
        if end >= len(sentences):
            break
        # Step back over whole sentences worth ~overlap of the chunk, but always move forward.
        back, kept = end, 0
        while back > start + 1 and kept < overlap * words:
            back -= 1
            kept += len(sentences[back].split())
        start, index = max(back, start + 1) if overlap > 0 else end, index + 1
