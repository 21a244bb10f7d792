"""The baselines every MeMo number is compared with. Every method uses the same executive as its reader,
so the methods differ only in where the knowledge comes from: nowhere (closed_book), BM25 top-k passages,
the gold paragraphs (oracle), or the memory model (memo_*, and memo_gold_decomp: the gold sub-questions
asked in order, what the memory knows independently of the executive). memo_rag is the hybrid: the
executive reads the memory's answers (single protocol) and the BM25 passages together."""

from __future__ import annotations

from memo.corpus import Document, chunk_document
from memo.errors import MemoError
from memo.evaluation.benchmarks import Question
from memo.text import IDK_ANSWER, find_spans, is_idk, short_answer

READER = ("Passages:\n{passages}\n\nUsing the passages, answer the question in a few words.\n"
          "Question: {q}\nAnswer:")
HYBRID = ("Facts from the memory:\n{facts}\n\nPassages:\n{passages}\n\nUsing the facts and the passages, answer the "
          "question in a few words.\nQuestion: {q}\nAnswer:")


class BM25Index:
    """BM25 over the corpus' passages (bm25s, English stop words removed)."""

    def __init__(self, passages: list[dict]):
        import bm25s

        if not passages:
            raise MemoError("BM25: the corpus has no passages")
        self.passages = passages
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([p["text"] for p in passages], stopwords="en", show_progress=False),
                             show_progress=False)

    def search(self, query: str, k: int) -> list[dict]:
        import bm25s

        k = min(k, len(self.passages))
        ids, _ = self.retriever.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False), k=k,
                                         show_progress=False)
        return [self.passages[i] for i in ids[0]]


def passages_of(docs: list[Document], chunk_words: int) -> list[dict]:
    out = []
    for d in docs:
        row = {"doc_id": d.doc_id, "title": d.title, "text": d.text, "doc_date": "", "source": d.source}
        out += [{"doc_id": c["doc_id"], "chunk_id": c["chunk_id"], "title": c["title"], "text": c["text"]}
                for c in chunk_document(row, "eval", chunk_words, 0.1)]
    return out


def expanded_search(index: BM25Index, question: str, facts: list[str], k: int) -> list[dict]:
    """k passages, alternating between the question's ranking and that of the question plus the names,
    dates and numbers the memory's answers add (the bridge entity hop 2's passage is about), without
    repeats: the memory's possibly wrong names can add passages but never push out the first half of
    the question's own top k. The answers' other words mostly repeat the question, so they are left out."""
    first = index.search(question, k)
    q = question.lower()
    added = list(dict.fromkeys(sp["text"] for f in facts for sp in find_spans(f) if sp["text"].lower() not in q))
    if not added:
        return first
    second = index.search(" ".join([question, *added]), k)
    out: list[dict] = []
    for a, b in zip(first, second):
        for p in (a, b):
            if p not in out and len(out) < k:
                out.append(p)
    return out


def read_passages(question: str, passages: list[dict], executive, max_tokens: int,
                  facts: list[str] | None = None) -> tuple[str, dict]:
    """The reader: BM25's or the gold passages; with `facts` (memo_rag), the memory's answers beside them."""
    text = "\n".join(f"[{i + 1}] {p['title'] + ': ' if p['title'] else ''}{p['text']}" for i, p in enumerate(passages))
    prompt = (HYBRID.format(facts="\n".join(f"- {f}" for f in facts), passages=text, q=question) if facts
              else READER.format(passages=text, q=question))
    messages = [{"role": "user", "content": prompt}]
    out = executive.complete(messages, max_tokens=max_tokens)
    return out.strip(), {"passages": [p.get("chunk_id", p["doc_id"]) for p in passages], "messages": messages,
                         "output": out}


def gold_subquestion(text: str, earlier: list[str]) -> str:
    """A MuSiQue decomposition step as a question for the memory: "#1" becomes the first answer, and the
    knowledge-graph form "Kris Benson >> member of sports team" becomes "What is the member of sports
    team of Kris Benson?"."""
    for i, a in enumerate(earlier, start=1):
        text = text.replace(f"#{i}", a)
    if ">>" in text:
        subject, _, relation = text.partition(">>")
        text = f"What is the {relation.strip()} of {subject.strip()}?"
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith("?") else "?") if text else text


def gold_decomposition(q: Question, memory) -> tuple[str, dict]:
    """Ask the memory the gold sub-questions in order, substituting earlier answers; answer with the last."""
    earlier: list[str] = []
    steps = []
    for d in q.decomposition:
        sub = gold_subquestion(d["question"], earlier)
        full = memory.ask([sub])[0]
        steps.append({"role": "memory", "question": sub, "answer": full, "gold": d.get("answer")})
        if is_idk(full):  # the chain breaks here: a later step would ask about "I don't know"
            return IDK_ANSWER, {"steps": steps, "memory_calls": len(steps), "broken_at": len(steps)}
        earlier.append(short_answer(sub, full))
        steps[-1]["short"] = earlier[-1]
    return (earlier[-1] if earlier else ""), {"steps": steps, "memory_calls": len(steps)}
