"""Text helpers every layer shares: QA normalisation and scores, "I don't know", and the spans (names,
numbers, dates) that the rules generator asks about and the executive's guard checks answers for."""

from __future__ import annotations

import re
import string
from collections import Counter

IDK_ANSWER = "I don't know."

_IDK = re.compile(r"\b(i don'?t know|i do not know|unknown|not sure)\b")
_PUNCT = set(string.punctuation)


def is_idk(answer: str) -> bool:
    """The memory abstained (or said nothing)."""
    return bool(_IDK.search(answer.lower())) or not answer.strip()


def normalize_answer(s: str) -> str:
    """Standard QA normalisation (SQuAD/HotpotQA): lowercase, drop punctuation and articles, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 after normalisation."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a reference or alias."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def f1(prediction: str, references: list[str]) -> float:
    """Best token F1 over the reference and its aliases."""
    return max((token_f1(prediction, r) for r in references), default=0.0)


def contains_reference(answer: str, refs: list[str]) -> bool:
    """A reference (or alias) appears in the answer as whole words after normalisation ("10" is not in "2010")."""
    a = f" {normalize_answer(answer)} "
    return any(normalize_answer(r) and f" {normalize_answer(r)} " in a for r in refs)


def item_score(answer: str, refs: list[str]) -> float:
    """1 when the answer contains a reference, else the best token F1 (partial credit)."""
    return 1.0 if contains_reference(answer, refs) else f1(answer, refs)


# Capitalised words that start sentences without being names.
NOT_NAMES = {"The", "A", "An", "In", "On", "At", "By", "For", "From", "After", "Before", "During", "Since",
             "When", "While", "Each", "Every", "All", "Both", "Most", "Some", "Many", "Its", "It", "He", "She",
             "They", "This", "That", "These", "Those", "His", "Her", "Their", "There", "Today", "However", "I",
             # openers of narrative sentences (a story summary's "As a sign of gratitude, ...")
             "As", "Later", "Then", "Soon", "Meanwhile", "Although", "Though", "Because", "If", "Once", "Until",
             "Unfortunately", "Fortunately", "Eventually", "Finally", "Suddenly", "Instead", "Now", "So", "But",
             "And", "Yet", "Despite", "Upon", "With", "Without", "Afterwards", "Next", "Still",
             "We", "You", "Our", "Your", "My", "Him", "Them", "Not", "No"}
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(rf"\b(?:{MONTHS}) \d{{1,2}}, \d{{4}}\b|\b\d{{1,2}} (?:{MONTHS}) \d{{4}}\b")
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?\b(?:\s+([a-z][a-z-]+))?")
_NAME = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][\w'-]*)*")


def lower_words(text: str) -> set[str]:
    """The words a text uses in lower case (`find_spans`' `common`)."""
    return set(re.findall(r"\b[a-z][a-z'-]*\b", text))


def find_spans(sentence: str, common: set[str] = frozenset()) -> list[dict]:
    """Maskable spans in a sentence: dates, years, counts and names; non-overlapping, in order. `common`:
    the words the surrounding text uses in lower case (`lower_words`); a one-word capitalised opener among
    them is no name ("Police detectives Marty Phillips ..." beside "the police")."""
    spans: list[dict] = []

    def free(a, b):
        return all(b <= s["start"] or a >= s["end"] for s in spans)

    for m in _DATE.finditer(sentence):
        spans.append({"start": m.start(), "end": m.end(), "kind": "date", "text": m.group()})
    for m in _YEAR.finditer(sentence):
        if free(m.start(), m.end()):
            spans.append({"start": m.start(), "end": m.end(), "kind": "year", "text": m.group()})
    for m in _NUMBER.finditer(sentence):
        num_end = m.start() + len(m.group().split()[0])
        if free(m.start(), num_end):
            spans.append({"start": m.start(), "end": m.end(), "kind": "number", "text": m.group(),
                          "noun": m.group(1) or ""})
    for m in _NAME.finditer(sentence):
        text, start = m.group(), m.start()
        first = text.split()[0]
        if first in NOT_NAMES:  # "The Halvenmere Cooperative" -> name "Halvenmere Cooperative"
            rest = text[len(first):].lstrip()
            if not rest:
                continue
            start, text = m.end() - len(rest), rest
        if text.split()[0] in MONTHS.split("|") or not free(start, start + len(text)):
            continue
        if start == 0 and " " not in text and text.lower() in common:
            continue
        spans.append({"start": start, "end": start + len(text), "kind": "name", "text": text})
    return sorted(spans, key=lambda s: s["start"])


def wanted_kinds(question: str) -> tuple[str, ...]:
    """The span kinds (find_spans) a question asks for, by its question word: "How many" a number,
    "When"/"What year" a date or year, every other question a name."""
    q = question.lower()
    if re.search(r"\bhow (?:many|much)\b", q):
        return ("number",)
    if re.search(r"\bwhen\b|\b(?:what|which) (?:year|date|day|month)\b", q):
        return ("date", "year")
    return ("name",)


def short_answer(question: str, answer: str) -> str:
    """The memory answers in sentences; a chained step needs the entity: the first span of the kind the
    question asks for that the question does not already contain ("Who founded X?" -> the name, not the
    year the answer also gives); else the first new span of any kind; else the whole answer."""
    q = question.lower()
    new = [sp for sp in find_spans(answer) if sp["text"].lower() not in q]
    kinds = wanted_kinds(question)
    best = next((sp for sp in new if sp["kind"] in kinds), new[0] if new else None)
    return best["text"] if best else answer.strip()


# Function words and question words: what an answer may repeat of its question without saying anything.
_FILLER = set("""a an the of in on at to for by with from and or as is was are were be been being has have had do
does did what who whom whose which when where why how s name named names called it its this that there their
his her they he she one after also""".split())


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _FILLER}


def stems(text: str, cut: int = 5) -> set[str]:
    """Content words cut to their first `cut` letters, a stemmer for relation words: at 5, "founded",
    "founder" and "found" are one; at 4 also "keeps" and "keeper" (a library stemmer keeps "keeper")."""
    return {w[:cut] for w in content_words(text)}


def adds_nothing(question: str, answer: str) -> bool:
    """True for an answer that only restates its question ("What was the name of Frankie's friend
    Jeff?" -> "Jeff's name was Jeff."): no content word the question does not already have. A
    generated pair like that teaches the memory to echo; a memory answer like that is an echo, not
    an answer, and not an abstention either (is_idk)."""
    return not is_idk(answer) and not (content_words(answer) - content_words(question))
