"""Cross-document groups formed from the corpus alone (no gold evidence sets): the input of the LLM
generator's cross-document step. Deterministic, so a resumed run sees the same groups and redoes nothing."""

from __future__ import annotations

import hashlib
from collections import Counter

import pandas as pd

from memo.synthesis.rules import entity_mentions


def in_corpus_order(chunks: pd.DataFrame) -> pd.DataFrame:
    """Chunks sorted by document id, then chunk index ("doc#3" before "doc#10")."""
    key = [(c.rsplit("#", 1)[0], int(c.rsplit("#", 1)[1]) if c.rsplit("#", 1)[-1].isdigit() else 0)
           for c in chunks["chunk_id"]]
    order = sorted(range(len(key)), key=key.__getitem__)
    return chunks.iloc[order].reset_index(drop=True)


def form_groups(chunks: pd.DataFrame, group_size: int = 3, max_groups: int = 0,
                group_by: str = "entities+bm25") -> tuple[list[dict], dict]:
    """Groups of chunks from different documents that are likely related, and a report of how.

    entities: documents sharing a rare-ish name (mentioned by 2..group_size*3 documents: a name in every
              document, like a country, relates nothing); one group per name, largest overlap first.
    bm25:     each document's top lexical neighbours (title + text as the query), for documents that no
              name group covers yet, so a corpus without shared names still gets groups.
    Every chunk id appears in groups in proportion to its relatedness; no gold labels are read.
    """
    chunks = in_corpus_order(chunks)  # Ray Data returns blocks in any order; groups must not depend on it
    first = chunks.drop_duplicates("doc_id").reset_index(drop=True)  # one chunk per document: the group's text
    docs = first.to_dict("records")
    n_docs = len(docs)
    cap = max_groups or n_docs
    groups: list[dict] = []
    seen: set[tuple] = set()
    report = Counter()
    if n_docs < 2:
        return [], {"documents": n_docs, "groups": 0, "note": "fewer than 2 documents: no cross-document groups"}

    def add(doc_idx: list[int], why: str, how: str) -> None:
        key = tuple(sorted(doc_idx))
        if len(key) < 2 or key in seen or len(groups) >= cap:
            return
        seen.add(key)
        members = [docs[i] for i in key]
        groups.append({"group_id": hashlib.sha256("|".join(m["chunk_id"] for m in members).encode()).hexdigest()[:12],
                       "how": how, "why": why, "doc_ids": [m["doc_id"] for m in members],
                       "chunk_ids": [m["chunk_id"] for m in members]})
        report[how] += 1

    index_of = {d["doc_id"]: i for i, d in enumerate(docs)}
    if "entities" in group_by:
        by_name: dict[str, set[str]] = {}
        for c in chunks.to_dict("records"):
            for m in entity_mentions(c):
                if len(m["entity"]) > 2:
                    by_name.setdefault(m["entity"], set()).add(m["doc_id"])
        shared = [(n, d) for n, d in by_name.items() if 2 <= len(d) <= max(group_size * 3, 4)]
        shared.sort(key=lambda nd: (-len(nd[1]), nd[0]))
        for name, doc_ids in shared:
            idx = sorted(index_of[d] for d in doc_ids)
            for k in range(0, len(idx), group_size):  # a name in many documents: several groups
                part = idx[k:k + group_size]
                if len(part) == 1 and k:
                    part = idx[k - 1:k + 1]
                add(part, f"they all mention {name}", "entities")
    if "bm25" in group_by:
        import bm25s

        covered = {d for g in groups for d in g["doc_ids"]}
        texts = [f"{d['title']} {d['text']}" for d in docs]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        k = min(group_size + 8, n_docs)
        order = [i for i, d in enumerate(docs) if d["doc_id"] not in covered] + \
                [i for i, d in enumerate(docs) if d["doc_id"] in covered]
        for i in order:
            res, scores = retriever.retrieve(bm25s.tokenize([texts[i]], stopwords="en", show_progress=False), k=k,
                                             show_progress=False)
            # Only real neighbours (score > 0), ties by position: group ids must be the same on every run,
            # or a resumed run would see new groups and redo finished work.
            ranked = sorted((-float(sc), int(j)) for j, sc in zip(res[0], scores[0]) if int(j) != i and sc > 0)
            idx = [j for _s, j in ranked][:group_size - 1]
            add([i] + idx, f"they share vocabulary with \"{docs[i]['title']}\"", "bm25")
    covered = {d for g in groups for d in g["doc_ids"]}
    info = {"documents": n_docs, "groups": len(groups), "by_method": dict(report), "group_size": group_size,
            "documents_in_a_group": len(covered),
            "mean_group_size": round(sum(len(g["doc_ids"]) for g in groups) / max(1, len(groups)), 2)}
    return groups, info
