"""The LLM generator's prompts (written for this project). Every reply is one JSON object.

PROMPT_VERSION is part of the synthesis resume key: change a prompt, bump it, and a re-run synthesizes
anew instead of answering "nothing to do" with reflections made by the old prompts.
"""

from __future__ import annotations

PROMPT_VERSION = "v2"  # v2: pairs whose answer only restates the question are dropped (pipeline.drop_echoes)
JUDGE_MAX_TOKENS = 48  # {"ok": false, "violations": ["unresolved_pronoun", "relative_time"]} is ~20 tokens
VIOLATIONS = ("unresolved_pronoun", "relative_time", "document_reference", "vague_reference", "missing_context",
              "incomplete_answer")


SYSTEM = ("You write training data for a memory model that will answer questions without seeing any document. "
          "Every question and every answer must stand alone: full names instead of pronouns, absolute dates "
          "instead of relative ones, and never a reference to 'the document', 'the text' or 'the passage'. "
          "Reply with one JSON object and nothing else.")


def _source(chunk: dict) -> str:
    head = f"Title: {chunk['title']}\n" + (f"Date: {chunk['doc_date']}\n" if chunk.get("doc_date") else "")
    return f"{head}\n{chunk['text']}"


def prompt_direct(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nWrite one question/answer pair for every fact this text states explicitly: "
            "each named person, place, organisation, work, number, role and date, minor ones included. "
            "Answers are 1-4 sentences and repeat the names they refer to.\n"
            'JSON: {"pairs": [{"question": "...", "answer": "..."}]}')


def prompt_indirect(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nWrite question/answer pairs for facts that need two or more sentences of this "
            "text combined: computed attributes (an age at an event, a duration), both directions of a relation "
            "(if X founded Y, ask who founded Y and also what X founded), pronouns resolved to the names they "
            "stand for, relative times made absolute with the date above, and a chain of actions asked from "
            "several angles. Answers are 1-4 sentences.\n"
            'JSON: {"pairs": [{"question": "...", "answer": "..."}]}')


def prompt_consolidate(title: str, pairs: list[dict]) -> str:
    listing = "\n".join(f"p{i + 1}. Q: {p['question']} A: {p['answer']}" for i, p in enumerate(pairs))
    return (f"Question/answer pairs about the document \"{title}\":\n{listing}\n\nMerge pairs that share "
            "something (an entity, a time, a cause and its effect, a sequence, a contrast) into composite "
            "questions over 2, 3 or 4 or more facts. Each answer covers every merged fact in at most 150 words. "
            "'merged' lists the ids of the pairs used.\n"
            'JSON: {"composites": [{"merged": ["p1", "p3"], "question": "...", "answer": "..."}]}')


def prompt_judge(question: str, answer: str) -> str:
    return (f"Question: {question}\nAnswer: {answer}\n\nDoes this pair stand alone for a reader who has never "
            "seen its source? Violations: " + ", ".join(VIOLATIONS) + ".\n"
            'JSON: {"ok": true, "violations": []} or {"ok": false, "violations": ["..."]}')


def prompt_rewrite(chunk: dict, question: str, answer: str, violations: list[str]) -> str:
    return (f"{_source(chunk)}\n\nThis question/answer pair about the text fails the stand-alone check "
            f"({', '.join(violations) or 'unclear'}):\nQuestion: {question}\nAnswer: {answer}\n\n"
            "Rewrite both from the text so that they stand alone and the answer is complete.\n"
            'JSON: {"question": "...", "answer": "..."}')


def prompt_entity(chunk: dict) -> str:
    return (f"{_source(chunk)}\n\nFor each named entity of this text (person, place, organisation, work, event), "
            "write questions that describe it WITHOUT naming it: by one distinctive fact (one_fact), by two "
            "facts (two_facts), by three or more facts (many_facts), and through its relation to another named "
            "entity (relation). The answer names the entity and repeats 1-2 facts that confirm it.\n"
            'JSON: {"entities": [{"name": "...", "questions": [{"kind": "one_fact", "question": "...", '
            '"answer": "..."}]}]}')


def prompt_cross(docs: list[dict], why: str) -> str:
    body = "\n\n".join(f"[{i + 1}] {_source(d)}" for i, d in enumerate(docs))
    return (f"These documents are related ({why}):\n\n{body}\n\nWrite questions whose answer needs facts from two "
            "or more of these documents: converging clues (facts from different documents that point to one "
            "entity; the answer names it and the facts) and parallel properties (which entities share one "
            "specific property; the answer lists them). 'documents' lists the numbers of the documents used.\n"
            'JSON: {"questions": [{"kind": "converging", "question": "...", "answer": "...", "documents": [1, 2]}]}')


def messages(user: str, nudge: bool = False) -> list[dict]:
    if nudge:  # the re-ask after an unparseable reply
        user += "\nYour previous reply was not valid JSON. Reply with the JSON object only."
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
