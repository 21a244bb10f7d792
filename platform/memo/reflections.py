"""Reflection synthesis: corpus -> question/answer pairs (Parquet) with Ray Data.

`synthesize` is the stage: chunking, a generator, dedup (exact and MinHash), abstention rows, rejects and
counts, written atomically. The LLM generators (hf, http, vllm: the paper's five prompted steps) live in
`memo.generator`; this module holds the offline `rules` GENERATOR, the method's steps without an LLM:
  direct        questions on a sentence's names, numbers, years and dates, fronted and cloze forms;
  indirect      the same fact from another angle: the relation asked in the other direction ("was founded
                by Y" -> "Who founded X?") and the verb replaced by a common synonym;
  entity        the sentence's subject described without naming it (against the reversal curse);
  consolidated  per document, what is known about its main entity (>= 3 facts);
  cross_doc     converging clues and bridge questions over entities shared by 2+ documents, grouped
                from the corpus alone (shared names; no gold evidence sets);
  abstain       questions about entities the corpus never mentions, answered "I don't know";
and the verification step as rule checks with one rewrite (resolve a leading pronoun, absolute dates).
Every pair's answer is a verbatim, self-contained corpus sentence, so nothing is invented.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from memo.config import SynthesizeConfig
from memo.corpus import chunk_document, corpus_hash, load_documents, split_sentences
from memo.errors import MemoError

IDK_ANSWER = "I don't know."
STEPS = ("direct", "indirect", "consolidated", "entity", "cross_doc", "abstain")
COLUMNS = ["id", "domain", "step", "question", "answer", "source_chunk_ids", "generator", "verified"]

# Capitalised words that start sentences without being names.
_NOT_NAMES = {"The", "A", "An", "In", "On", "At", "By", "For", "From", "After", "Before", "During", "Since",
              "When", "While", "Each", "Every", "All", "Both", "Most", "Some", "Many", "Its", "It", "He", "She",
              "They", "This", "That", "These", "Those", "His", "Her", "Their", "There", "Today", "However", "I"}
_WH = {"Who", "Whom", "Whose", "What", "When", "Where", "Which", "Why", "How", "Is", "Was", "Are", "Were", "Did",
       "Does", "Do", "Can", "Name", "List"}
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DATE = re.compile(rf"\b(?:{_MONTHS}) \d{{1,2}}, \d{{4}}\b|\b\d{{1,2}} (?:{_MONTHS}) \d{{4}}\b")
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?\b(?:\s+([a-z][a-z-]+))?")
_NAME = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][\w'-]*)*")
_PRONOUN_START = re.compile(r"^(It|He|She|They|This|These|Those|His|Her|Its|Their)\b")
_VAGUE = re.compile(r"\b(the (document|article|text|passage|author)|this (document|article|text|passage))\b", re.I)
_RELATIVE = re.compile(r"\b(last|this|next) year\b", re.I)
# Head nouns that let a description say what kind of thing a name is ("which division ...").
_HEADS = set("""academy agency array association award bank bridge cell center centre college company council
cooperative corporation department division engine festival foundation fund group guild hospital index
institute island lab laboratory lake lantern league library market museum network observatory office
orchestra party port prize program programme project relay river school series society station street
summit system team telescope theatre tower town university valley works""".split())


def stable_id(domain: str, question: str) -> str:
    """Stable row id: same domain + normalised question -> same id, so re-runs and dedup agree."""
    norm = re.sub(r"\W+", " ", question.lower()).strip()
    return hashlib.sha256(f"{domain}\x00{norm}".encode()).hexdigest()[:16]


def find_spans(sentence: str) -> list[dict]:
    """Maskable spans in a sentence: dates, years, counts and names; non-overlapping, in order."""
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
        if first in _NOT_NAMES:  # "The Halvenmere Cooperative" -> name "Halvenmere Cooperative"
            rest = text[len(first):].lstrip()
            if not rest:
                continue
            start, text = m.end() - len(rest), rest
        if text.split()[0] in _MONTHS.split("|") or not free(start, start + len(text)):
            continue
        spans.append({"start": start, "end": start + len(text), "kind": "name", "text": text})
    return sorted(spans, key=lambda s: s["start"])


def _head(name: str) -> str:
    last = name.split()[-1].lower()
    return last if len(name.split()) > 1 and last in _HEADS else ""


def _with_article(sentence: str, span: dict) -> tuple[int, int]:
    """Extend a name span over a preceding article, so "the Vessamere Lantern" is masked as a whole."""
    a = span["start"]
    for art in ("the ", "The "):
        if sentence[max(0, a - 4):a] == art:
            return a - 4, span["end"]
    for det in ("Each ", "Every "):  # "Each Corvane Cell weighs ...": the determiner belongs to the subject
        if sentence[:a] == det:
            return 0, span["end"]
    return a, span["end"]


def _wh(sentence: str, span: dict) -> tuple[int, int, str]:
    """The wh-phrase replacing a span, and the exact [a, b) range it replaces (prepositions included)."""
    a, b = _with_article(sentence, span) if span["kind"] == "name" else (span["start"], span["end"])
    before = sentence[:a].rstrip()
    prep = before.split()[-1] if before.split() else ""
    if span["kind"] == "date":
        return a, b, "which date"
    if span["kind"] == "year":
        return a, b, "which year"
    if span["kind"] == "number":
        return a, b, f"how many {span['noun']}".strip()
    if prep in ("in", "at", "near", "from") and not _head(span["text"]):
        return a - len(prep) - 1, b, "where" if prep != "from" else "from where"
    if prep == "by":
        return a, b, "whom"
    head = _head(span["text"])
    return a, b, f"which {head}" if head else "what"


def is_modifier(sentence: str, span: dict) -> bool:
    """True when the span modifies a noun phrase ("the 2010 Quillstead Tide Summit", "the Drossel Yard
    factory"): replacing it with a wh-word leaves a broken question."""
    after = sentence[span["end"]:]
    if span["kind"] in ("year", "number", "date") and (sentence[:span["start"]].endswith("the ") or re.match(r"^\s+[A-Z]", after)):
        return True
    if span["kind"] == "name" and re.search(r"\d $", sentence[:span["start"]]):
        return True
    return span["kind"] == "name" and bool(re.match(r"^\s+(?!(?:on|in|at|to|for|from|of|since|by|and|with|is|was|are|were)\b)[a-z]", after))


def cloze(sentence: str, span: dict, replacement: str | None = None) -> str:
    """Question asking for `span` in `sentence`; `replacement` swaps a bridge entity for its description."""
    a, b, wh = _wh(sentence, span)
    q = sentence[:a] + wh + sentence[b:]
    if replacement:
        q = replacement(q)
    q = q.rstrip(" .!")
    return q[0].upper() + q[1:] + "?"


def describe(sentence: str, span: dict) -> str:
    """A noun phrase naming the entity at `span` only through the rest of the sentence.

    subject: "the division that is based in Skarreth Point"; object: "the lantern that the
    Glimmerfield Division designs".
    """
    a, b = _with_article(sentence, span)
    head = _head(span["text"]) or "one"
    if a == 0:
        rest = sentence[b:].strip().rstrip(".")
        return f"the {head} that {rest}"
    rest = (sentence[:a] + sentence[b:]).strip().rstrip(".")
    rest = re.sub(r"\s+([,;])", r"\1", re.sub(r"\s+", " ", rest)).strip()
    return f"the {head} that {rest[0].lower() + rest[1:] if rest[:4] == 'The ' else rest}"


_IRREGULAR = {"won": "win", "grew": "grow", "gave": "give", "wrote": "write", "became": "become", "drew": "draw",
              "took": "take", "made": "make", "built": "build", "bought": "buy", "led": "lead", "held": "hold",
              "sold": "sell", "began": "begin", "ran": "run", "sent": "send", "met": "meet", "taught": "teach",
              "brought": "bring", "found": "find", "had": "have", "has": "have", "went": "go", "left": "leave"}
_PASSIVE = re.compile(r"^(is|was|are|were) (born|built|held|made|sold|run|led|won|given|written|\w+ed)\b(.*)$")


def _lemma(verb: str) -> str | None:
    """Base form of a past or third-person verb, by rule; None when the word does not look like one."""
    if verb in _IRREGULAR:
        return _IRREGULAR[verb]
    if verb.endswith("ied"):
        return verb[:-3] + "y"
    if verb.endswith("ed"):
        stem = verb[:-2]
        return stem + "e" if stem.endswith(("v", "c", "s", "g", "z", "u", "at", "it", "ur")) else stem
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses", "xes")):
        return verb[:-2]
    if verb.endswith("s") and not verb.endswith("ss"):
        return verb[:-1]
    return None


def fronted(sentence: str, subject: dict, target: dict) -> str | None:
    """A wh-question in the word order people use ("When was X founded?", "How many patents does X
    hold?"), asking for `target` in a "<Subject> <verb> ..." sentence; None when no rule applies.

    Users rarely ask cloze-style echo questions; training on both forms makes the memory answer the
    reworded questions it is actually asked.
    """
    a, b = _with_article(sentence, subject)
    subj = sentence[a:b]
    subj = subj[0].lower() + subj[1:] if subj.startswith(("The ", "Each ", "Every ")) else subj
    rest = sentence[b:].strip().rstrip(".")
    t_a, t_b, wh = _wh(sentence, target)
    t_a -= b + 1  # offsets inside `rest`
    t_b -= b + 1
    if t_a < 0:
        return None
    before, after = rest[:t_a].rstrip(), rest[t_b:].strip()
    if target["kind"] == "number":  # "138 staff members": the whole noun phrase goes into "how many ..."
        more = re.match(r"^((?:(?!(?:on|in|at|to|for|from|of|since|by|and|across)\b)[a-z][\w-]*\s?)*)", after)
        if more and more.group(1).strip():
            wh = f"{wh} {more.group(1).strip()}"
            after = after[more.end():].strip()
    if re.search(r"(\band|,)$", before) or re.match(r"^(and\b|,)", after) or re.search(r"\d$", before):
        return None  # one item of a list, or a name glued to a number: no clean question
    if target["kind"] == "name" and re.match(r"^(?!(?:on|in|at|to|for|from|of|since|by|and|with)\b)[a-z]", after):
        return None  # the name modifies a noun ("the Drossel Yard factory"): asking for it alone breaks the phrase
    if target["kind"] in ("year", "date") or wh == "whom":
        before = re.sub(r"\s(in|on|since|by|at)$", "", before)  # the wh-word replaces the preposition
    without = re.sub(r"\s+", " ", f"{before} {after}".strip())
    if re.match(r"^(has|have|had) \w+ed\b", without):
        return None  # present perfect: no simple fronted form by rule
    passive = _PASSIVE.match(without)
    if passive:
        aux, part, tail = passive.groups()
        if target["kind"] == "name" and wh == "whom":
            return f"By whom {aux} {subj} {part}{tail}?"
        wh = {"which year": "When", "which date": "On which date"}.get(wh, wh)
        return f"{wh[0].upper() + wh[1:]} {aux} {subj} {part}{tail}?" if wh in ("When", "where", "On which date") \
            or wh.startswith("how many") else None
    verb, _, complement = without.partition(" ")
    lemma = _lemma(verb)
    if not lemma or verb[0].isupper() or verb in ("is", "was", "are", "were"):
        return None
    aux = "does" if verb.endswith("s") and verb not in _IRREGULAR or verb == "has" else "did"
    if target["kind"] == "number" and rest[t_a - 1:t_a] == " " and not target["noun"]:
        return None
    wh = {"which year": "When", "which date": "On which date", "whom": "Whom", "where": "Where",
          "from where": "From where"}.get(wh, wh)
    complement = re.sub(r"\b(in|at|on|by)\s*$", "", complement).strip()
    q = f"{wh[0].upper() + wh[1:]} {aux} {subj} {lemma} {complement}".strip()
    return re.sub(r"\s+([,;])", r"\1", re.sub(r"\s+", " ", q)) + "?"


# Common relation verbs and everyday synonyms (base forms). A user rarely repeats the corpus's verb;
# a small model answers a reworded question far more often when it was trained on more than one
# wording. General English, not tuned to any corpus; an LLM generator paraphrases on its own.
SYNONYMS = {
    "found": ["start", "establish"], "establish": ["found", "set up"], "create": ["make", "set up"],
    "lead": ["head", "run"], "head": ["lead", "run"], "direct": ["lead", "run"], "manage": ["run", "lead"],
    "run": ["operate", "manage"], "operate": ["run", "manage"], "own": ["hold", "have"],
    "hold": ["own", "have"], "build": ["make", "produce"], "make": ["produce", "build"],
    "produce": ["make", "build"], "manufacture": ["make", "produce"], "assemble": ["put together", "build"],
    "design": ["create", "develop"], "develop": ["create", "design"], "invent": ["create", "come up with"],
    "write": ["author", "pen"], "publish": ["release", "put out"], "release": ["put out", "publish"],
    "issue": ["send out", "release"], "send": ["dispatch", "deliver"], "award": ["give", "hand out"],
    "give": ["present", "deliver"], "grant": ["give", "award"], "present": ["give", "show"],
    "receive": ["get", "win"], "win": ["receive", "earn"], "earn": ["receive", "get"],
    "host": ["organize", "hold"], "organize": ["host", "run"], "demonstrate": ["show", "present"],
    "show": ["display", "present"], "study": ["learn", "train in"], "teach": ["instruct in", "give lessons in"],
    "join": ["enter", "become part of"], "leave": ["quit", "depart from"], "use": ["rely on", "employ"],
    "store": ["keep", "hold"], "sell": ["market", "offer"], "buy": ["purchase", "acquire"],
    "acquire": ["buy", "purchase"], "open": ["launch", "start"], "launch": ["start", "open"],
    "close": ["shut", "shut down"], "employ": ["have on staff", "engage"], "fund": ["finance", "pay for"],
    "support": ["back", "help"], "discover": ["find", "uncover"], "locate": ["place", "situate"],
}
_PARTICIPLE_AS_PAST = re.compile(r"^(\w+ed|built|held|made|sold|run|led|won|sent|taught|brought|found|bought)$")


def _third_person(lemma: str) -> str:
    if lemma in ("have", "do", "go"):
        return {"have": "has", "do": "does", "go": "goes"}[lemma]
    if lemma.endswith(("s", "sh", "ch", "x", "z")):
        return lemma + "es"
    if lemma.endswith("y") and lemma[-2:-1] not in "aeiou":
        return lemma[:-1] + "ies"
    return lemma + "s"


def active_agent(sentence: str, subject: dict, agent: dict) -> str | None:
    """The relation asked in the other direction: "X was founded in 1987 by Y." -> "Who founded X in
    1987?" (and "Which society awards X?" for "X is awarded by the Velmora Maritime Society")."""
    a, b = _with_article(sentence, subject)
    subj = sentence[a:b]
    subj = subj[0].lower() + subj[1:] if subj.startswith(("The ", "Each ", "Every ")) else subj
    g_a, _ = _with_article(sentence, agent)
    m = re.match(r"^\s*(is|was|are|were) (\w+)\b(.*)\bby\s*$", sentence[b:g_a])
    if not m or sentence[agent["end"]:].strip(" .") or not _PARTICIPLE_AS_PAST.match(m.group(2)):
        return None
    aux, part, tail = m.groups()
    lemma = _lemma(part)
    if not lemma:
        return None
    verb = part if aux in ("was", "were") else _third_person(lemma)
    head = _head(agent["text"])
    wh = f"Which {head}" if head else "Who"
    q = re.sub(r"\s+", " ", f"{wh} {verb} {subj} {tail.strip()}").strip()
    return re.sub(r"\s+([,;])", r"\1", q) + "?"


_PAST = {"set": "set", "put": "put", "run": "ran", "hold": "held", "make": "made", "give": "gave", "send": "sent",
         "win": "won", "get": "got", "find": "found", "keep": "kept", "buy": "bought", "shut": "shut",
         "pay": "paid", "come": "came", "become": "became", "have": "had", "quit": "quit", "lead": "led",
         "build": "built", "sell": "sold", "teach": "taught", "leave": "left", "show": "showed"}


# So _lemma() can undo every past tense _past() forms.
_IRREGULAR.update({past: lemma for lemma, past in _PAST.items() if past not in _IRREGULAR and past != lemma + "ed"})


def _past(lemma: str) -> str:
    if lemma in _PAST:
        return _PAST[lemma]
    if lemma.endswith("e"):
        return lemma + "d"
    if lemma.endswith("y") and lemma[-2:-1] not in "aeiou":
        return lemma[:-1] + "ied"
    return lemma + "ed"


def with_synonym(sentence: str, subject: dict, index: int = 0) -> str | None:
    """The sentence with the verb after its subject swapped for a synonym in the same form
    ("Wenna Ostrocliff leads the Ketterline Lab." -> "... heads ..."); None when the verb has none.
    Questions are then built from it by the same rules, so word order stays grammatical."""
    _, b = _with_article(sentence, subject)
    m = re.match(r"^(\s+(?:is |was |are |were )?)(\w+)\b", sentence[b:])
    if not m:
        return None
    aux, verb = m.group(1).strip(), m.group(2)
    lemma = verb if verb in SYNONYMS else _lemma(verb)
    if not lemma or lemma not in SYNONYMS:
        return None
    syn = SYNONYMS[lemma][index % len(SYNONYMS[lemma])]
    first, _, rest = syn.partition(" ")
    if aux or verb.endswith("ed") or verb in _IRREGULAR and verb not in ("has",):
        if aux and not _PARTICIPLE_AS_PAST.match(_past(first)):
            return None  # a passive needs a participle we can form by rule
        first = _past(first)
    elif verb.endswith("s"):
        first = _third_person(first)
    new = " ".join(x for x in (first, rest) if x)
    at = b + m.start(2)
    return sentence[:at] + new + sentence[at + len(verb):]


def check_self_contained(question: str, answer: str) -> str | None:
    """The verification step's rules: return the violation, or None when the pair stands alone."""
    for text in (question, answer):
        if _PRONOUN_START.search(text):
            return "unresolved pronoun"
        if _VAGUE.search(text):
            return "reference to the document"
        if _RELATIVE.search(text):
            return "relative time"
    return None


def rewrite_sentence(sentence: str, title: str, doc_date: str) -> str:
    """One rewrite attempt: resolve a leading pronoun to the document's subject, relative years to absolute."""
    subject = re.sub(r"^(The|A|An) ", "", title).strip()
    s = _PRONOUN_START.sub(lambda m: subject if m.group(1) in ("It", "He", "She", "They", "This") else subject + "'s",
                           sentence, count=1)
    year = doc_date[:4] if re.match(r"\d{4}", doc_date or "") else None
    if year:
        s = _RELATIVE.sub(lambda m: f"in {int(year) + {'last': -1, 'this': 0, 'next': 1}[m.group(1).lower()]}", s)
    return s


def _row(domain, step, question, answer, chunk_ids, verified=True):
    return {"id": stable_id(domain, question), "domain": domain, "step": step, "question": question,
            "answer": answer, "source_chunk_ids": list(chunk_ids), "generator": "rules", "verified": verified}


def _reject(domain, step, question, answer, chunk_ids, reason):
    return {**_row(domain, step, question, answer, chunk_ids, verified=False), "reason": reason}


def chunk_sentences(chunk: dict) -> list[str]:
    """A chunk's sentences after the rewrite step; sentences that still fail are returned as-is and rejected later."""
    return [rewrite_sentence(s, chunk["title"], chunk["doc_date"]) for s in split_sentences(chunk["text"])]


def synthesize_chunk(chunk: dict, max_direct_per_sentence: int = 1) -> tuple[list[dict], list[dict]]:
    """Steps direct, entity, consolidated for one chunk; returns (reflections, rejects)."""
    domain, cid = chunk["domain"], chunk["chunk_id"]
    out, rejects = [], []

    def add(step, q, a, ids=(cid,)):
        problem = check_self_contained(q, a)
        (rejects.append(_reject(domain, step, q, a, ids, problem)) if problem else out.append(_row(domain, step, q, a, ids)))

    sentences = chunk_sentences(chunk)
    facts_about: dict[str, list[str]] = {}
    for s in sentences:
        spans = find_spans(s)
        if not spans:
            rejects.append(_reject(domain, "direct", "", s, [cid], "no name, number or date to ask about"))
            continue
        subject = spans[0] if spans[0]["kind"] == "name" and _with_article(s, spans[0])[0] == 0 else None
        if subject:
            facts_about.setdefault(subject["text"], []).append(s)
            add("entity", cloze(s, subject).replace("What ", "Who or what ", 1), s)
        # Prefer numbers, dates and the last names: they carry the facts users ask about.
        targets = [sp for sp in spans if sp is not subject]
        targets.sort(key=lambda sp: (["number", "date", "year", "name"].index(sp["kind"]), -sp["start"]))
        for k, sp in enumerate(targets[:max_direct_per_sentence]):
            # Two phrasings of the first question where rules allow: a small model only learns to
            # answer reworded questions when each fact was asked more than one way.
            # Each fact is asked two ways: the fronted question and, for the sentence's main fact, the
            # same with a synonym verb (indirect) or else the cloze form.
            asked = [q for q in dict.fromkeys([subject and fronted(s, subject, sp),
                                               None if is_modifier(s, sp) else cloze(s, sp)]) if q]
            reworded = subject and k == 0 and with_synonym(s, subject)
            span = reworded and next((x for x in find_spans(reworded) if x["text"] == sp["text"]), None)
            synonym_q = span and fronted(reworded, subject, span)
            if synonym_q and synonym_q not in asked:
                add("direct", asked[0], s)
                add("indirect", synonym_q, s)
            else:
                for q in asked[:2 if k == 0 else 1]:
                    add("direct", q, s)
        agent = subject and next((sp for sp in targets if sp["kind"] == "name" and active_agent(s, subject, sp)), None)
        if agent:
            add("indirect", active_agent(s, subject, agent), s)
            reworded = with_synonym(s, subject)
            span = reworded and next((x for x in find_spans(reworded) if x["text"] == agent["text"]), None)
            q = span and active_agent(reworded, subject, span)
            if q:
                add("indirect", q, s)
    for entity, facts in facts_about.items():
        if len(facts) >= 3:
            head = _head(entity)
            article = "the " if head else ""
            add("consolidated", f"What is known about {article}{entity}?", " ".join(facts[:4]))
    return out, rejects


def synthesize_batch(batch: pd.DataFrame, max_direct_per_sentence: int = 1) -> pd.DataFrame:
    """Ray Data `map_batches` body: chunks in, reflection rows out (rejects flagged by a non-empty reason)."""
    rows = []
    for chunk in batch.to_dict("records"):
        good, bad = synthesize_chunk(chunk, max_direct_per_sentence)
        rows += [{**r, "reason": ""} for r in good] + bad
    return pd.DataFrame(rows, columns=COLUMNS + ["reason"])


def entity_mentions(chunk: dict) -> list[dict]:
    """Ray Data `flat_map` body: one row per (name, sentence), the input of cross-document grouping."""
    rows = []
    for i, s in enumerate(chunk_sentences(chunk)):
        for sp in find_spans(s):
            if sp["kind"] == "name":
                rows.append({"entity": sp["text"], "doc_id": chunk["doc_id"], "chunk_id": chunk["chunk_id"],
                             "domain": chunk["domain"], "sentence": s, "sent_index": i})
    return rows


def cross_doc_group(group: pd.DataFrame, per_entity: int = 4) -> pd.DataFrame:
    """Ray Data `map_groups` body for one shared entity: bridge and converging-clue questions.

    Documents are grouped by the names they share, which any corpus has; the paper's code used each
    benchmark question's gold evidence, which no real deployment has. Bridges name the entity only
    through a fact of document A and ask for another fact of document B; every fact of B gets its turn
    (round robin over document pairs) before a pair gets a second one, up to `per_entity` rows.
    """
    entity = group["entity"].iloc[0] if len(group) else ""
    # A mention inside a list ("operates A, B and C") gives garbled descriptions; leave those out.
    listed = re.compile(rf"(,\s*(the\s+)?{re.escape(entity)}|{re.escape(entity)}\s*,|\band\s+(the\s+)?{re.escape(entity)}"
                        rf"|{re.escape(entity)}\s+and\b)")
    mentions = [m for m in group.drop_duplicates(["doc_id", "sentence"]).to_dict("records")
                if not listed.search(m["sentence"])]
    docs = sorted({m["doc_id"] for m in mentions})
    if len(docs) < 2:
        return pd.DataFrame([], columns=COLUMNS + ["reason"])
    domain = mentions[0]["domain"]
    by_doc = {d: [m for m in mentions if m["doc_id"] == d] for d in docs}

    def span_of(m):
        return next(sp for sp in find_spans(m["sentence"]) if sp["kind"] == "name" and sp["text"] == entity)

    def bridge(ma, mb):
        span_b = span_of(mb)
        desc_a = describe(ma["sentence"], span_of(ma))
        a, b = _with_article(mb["sentence"], span_b)
        target = next((sp for sp in find_spans(mb["sentence"])
                       if (sp["end"] <= a or sp["start"] >= b) and not is_modifier(mb["sentence"], sp)), None)
        if not target:
            return None
        sent_b = mb["sentence"]
        q = cloze(sent_b, target, replacement=lambda q, s=sent_b, a=a, b=b: q.replace(s[a:b], desc_a, 1))
        q = re.sub(r"^What ", "Who or what ", re.sub(r"\s+([,;?])", r"\1", q))
        return _row(domain, "cross_doc", q, f"{ma['sentence']} {mb['sentence']}", [ma["chunk_id"], mb["chunk_id"]])

    def converging(ma, mb):
        desc_a, desc_b = describe(ma["sentence"], span_of(ma)), describe(mb["sentence"], span_of(mb))
        q = f"Which is {desc_a}, and also that {desc_b.split(' that ', 1)[1]}?"
        return _row(domain, "cross_doc", q[0].upper() + q[1:], f"{entity}. {ma['sentence']} {mb['sentence']}",
                    [ma["chunk_id"], mb["chunk_id"]])

    # Candidates in rounds: each round takes one more fact of each document, so coverage spreads out.
    rounds = max(len(v) for v in by_doc.values())
    rows: list[dict] = []
    for k in range(rounds):
        for j, (da, db) in enumerate(itertools.permutations(docs, 2)):
            ma_list, mb_list = by_doc[da], by_doc[db]
            if k < len(mb_list):  # pairs start at different facts, so a cap still covers each document
                row = bridge(ma_list[(j + k) % len(ma_list)], mb_list[(j + k) % len(mb_list)])
                if row:
                    rows.append(row)
        if k == 0:
            rows += [converging(by_doc[da][0], by_doc[db][0]) for da, db in itertools.combinations(docs, 2)][:1]
    rows = list({r["id"]: r for r in rows}.values())[:per_entity]
    return pd.DataFrame([{**r, "reason": ""} for r in rows], columns=COLUMNS + ["reason"])


def abstain_rows(reflections: pd.DataFrame, corpus_text: str, ratio: float, domain: str) -> list[dict]:
    """Questions about names the corpus never mentions, answered "I don't know" (train as you serve).

    Made from real direct questions with the name swapped for an invented one, so the memory learns to
    abstain on an unknown entity rather than on an unusual question shape.
    """
    direct = reflections[reflections.step == "direct"]
    n = int(round(len(reflections) * ratio))
    syll = ["bar", "dun", "mo", "rel", "vik", "sta", "lor", "quin", "te", "zar", "ost", "hel"]
    rows = []
    for i, r in enumerate(direct.itertuples()):
        if len(rows) >= n:
            break
        # Question words are capitalised too: "Where does X ..." must swap X, not "Where".
        names = [sp for sp in find_spans(r.question) if sp["kind"] == "name" and sp["text"].split()[0] not in _WH]
        if not names:
            continue
        h = int(hashlib.sha256(r.question.encode()).hexdigest(), 16)
        fake = (syll[h % 12] + syll[(h >> 4) % 12] + syll[(h >> 8) % 12]).capitalize()
        if fake.lower() in corpus_text.lower():
            continue
        words = names[0]["text"].split()
        new_name = " ".join([fake] + words[1:]) if len(words) > 1 else fake
        q = r.question.replace(names[0]["text"], new_name)
        rows.append(_row(domain, "abstain", q, IDK_ANSWER, r.source_chunk_ids))
    return rows


def dataset_hash(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for rid, q, a in sorted(zip(df["id"], df["question"], df["answer"])):
        h.update(f"{rid}\x00{q}\x00{a}\x01".encode())
    return h.hexdigest()


REJECT_COLUMNS = ["domain", "step", "input_id", "question", "answer", "source_chunk_ids", "generator", "reason", "raw"]
# Settings that change what is generated (the resume key); workers, timeouts and the key's variable do not.
_RUN_ONLY = ("out", "workers", "corpus", "concurrency", "request_timeout", "retries", "batch_size", "api_key_env")


def _rules_steps(cfg: SynthesizeConfig, chunks, progress) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """The offline generator over Ray Data: per-chunk tasks, then cross-document groups by shared names."""
    local = chunks.map_batches(synthesize_batch, batch_format="pandas", batch_size=16,
                               fn_kwargs={"max_direct_per_sentence": cfg.max_direct_per_sentence}).to_pandas()
    progress(f"[synthesize] per-chunk steps: {int((local.reason == '').sum())} pairs, "
             f"{int((local.reason != '').sum())} rejected")
    mentions = chunks.flat_map(entity_mentions).materialize()  # counted, grouped twice: extract once
    cross = pd.DataFrame(columns=COLUMNS + ["reason"])
    groups = 0
    if mentions.count():
        groups = int((mentions.to_pandas().groupby("entity")["doc_id"].nunique() >= 2).sum())
        cross = mentions.groupby("entity", num_partitions=4).map_groups(
            cross_doc_group, batch_format="pandas", fn_kwargs={"per_entity": cfg.cross_doc_per_entity}).to_pandas()
    if cross.empty:  # no entity in 2+ chunks (a one-document corpus): map_groups returns no columns
        cross = pd.DataFrame(columns=COLUMNS + ["reason"])
    cross = cross.head(cfg.max_cross_doc_pairs)
    progress(f"[synthesize] cross-document step: {len(cross)} pairs over "
             f"{len({tuple(x) for x in cross['source_chunk_ids']})} chunk pairs, from {groups} names shared by 2+ documents")
    allrows = pd.concat([local, cross], ignore_index=True)
    rejects = allrows[allrows.reason != ""].reset_index(drop=True)
    good = allrows[allrows.reason == ""].drop(columns=["reason"])
    steps = {"per_chunk": {"in": chunks.count(), "out": int((local.reason == "").sum()),
                           "rejected": int((local.reason != "").sum())},
             "cross_doc": {"in": groups, "out": int((cross.reason == "").sum()), "rejected": int((cross.reason != "").sum())}}
    return good, rejects, steps, {"by_method": {"entities": groups}, "groups": groups,
                                  "note": "one group per name shared by 2+ documents"}


def _llm_steps(cfg: SynthesizeConfig, chunks, out: Path, progress) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict, dict]:
    from memo.generator import run_pipeline

    res = run_pipeline(cfg, chunks.to_pandas(), out, progress)
    gen = f"{cfg.generator}:{cfg.model or 'smollm2-135m'}"
    p = res["pairs"]
    good = pd.DataFrame({"id": [stable_id(cfg.domain, q) for q in p["question"]], "domain": cfg.domain,
                         "step": p["step"].values, "question": p["question"].values, "answer": p["answer"].values,
                         "source_chunk_ids": [list(x) for x in p["source_chunk_ids"]], "generator": gen,
                         "verified": p["verified"].astype(bool).values,
                         "merged_from": [list(x) for x in p["merged_from"]]}, columns=COLUMNS + ["merged_from"])
    r = res["rejects"]
    rejects = pd.DataFrame({"domain": cfg.domain, "step": r["step"].values, "input_id": r["input_id"].values,
                            "question": r["question"].values, "answer": r["answer"].values,
                            "source_chunk_ids": [list(x) for x in r["source_chunk_ids"]], "generator": gen,
                            "reason": r["reason"].values, "raw": r["raw"].values}, columns=REJECT_COLUMNS)
    return good, rejects, res["steps"], res["groups"], {"throughput": res["throughput"], "step_dir": res["step_dir"]}


def dedup(good: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, dict]:
    """Exact duplicates (same normalised question, i.e. the same id) then near duplicates (MinHash)."""
    from memo.generator import near_duplicates

    before = len(good)
    good = good.drop_duplicates("id").reset_index(drop=True)
    exact = before - len(good)
    drop = near_duplicates(list(good["question"]), list(good["answer"]), threshold)
    good = good.drop(index=drop).reset_index(drop=True)
    return good, {"exact": exact, "near": len(drop), "near_threshold": threshold}


def synthesize(cfg: SynthesizeConfig, progress=print) -> dict:
    """Run the whole synthesis stage; returns the stats written to OUT/stats.json.

    Re-running with the same corpus and config reuses the finished output instead of redoing it; an LLM
    run interrupted mid-way resumes from its per-step outputs (OUT/steps/).
    """
    import ray

    docs = load_documents(cfg.corpus)
    chash = corpus_hash(docs)
    out = Path(cfg.out)
    stats_path = out / "stats.json"
    settings = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY}
    if stats_path.exists():
        old = json.loads(stats_path.read_text())
        if old.get("corpus_hash") == chash and old.get("settings") == settings:
            progress(f"[synthesize] {out} already holds reflections for this corpus and config "
                     f"({old['rows']} rows); nothing to do")
            return old
    t0 = time.time()
    progress(f"[synthesize] {len(docs)} documents from {cfg.corpus}, generator={cfg.generator}")
    ds = ray.data.from_items([asdict(d) for d in docs])
    # Chunking is light: a quarter CPU lets it run beside Serve replicas that hold whole CPUs (the http
    # generator pointed at this cluster's own router) instead of waiting for one forever.
    chunks = ds.flat_map(chunk_document, fn_kwargs={"domain": cfg.domain, "chunk_words": cfg.chunk_words,
                                                    "overlap": cfg.chunk_overlap}, num_cpus=0.25).materialize()
    n_chunks = chunks.count()
    progress(f"[synthesize] {n_chunks} chunks")
    extra: dict = {}
    if cfg.generator == "rules":
        good, rejects, steps, groups = _rules_steps(cfg, chunks, progress)
        rejects = rejects.assign(input_id="", raw="")[REJECT_COLUMNS]
    else:
        good, rejects, steps, groups, extra = _llm_steps(cfg, chunks, out, progress)
    good, dup = dedup(good, cfg.near_duplicate)
    progress(f"[synthesize] dedup: {dup['exact']} exact and {dup['near']} near-duplicate questions removed")
    abstain = pd.DataFrame(abstain_rows(good, " ".join(d.text for d in docs), cfg.abstain_ratio, cfg.domain),
                           columns=COLUMNS)
    if cfg.generator != "rules":
        abstain["generator"] = good["generator"].iloc[0] if len(good) else cfg.generator
    good = pd.concat([good, abstain], ignore_index=True) if len(abstain) else good
    good["source_chunk_ids"] = good["source_chunk_ids"].map(list)
    # Consolidated rows name the pairs they merge (the stable ids); every other row has an empty list.
    merged = good["merged_from"] if "merged_from" in good else [None] * len(good)
    good["merged_from"] = [[] if m is None or isinstance(m, float) else list(m) for m in merged]  # NaN: no lineage
    rejects = rejects.reset_index(drop=True)
    stats = {
        "domain": cfg.domain, "generator": cfg.generator, "corpus": str(Path(cfg.corpus).resolve()),
        "corpus_hash": chash, "documents": len(docs), "chunks": n_chunks, "rows": len(good),
        "per_step": {s: int((good.step == s).sum()) for s in STEPS},
        "steps": steps, "groups": groups,
        "rejected": len(rejects), "rejected_by_reason": dict(Counter(r.split(":")[0] for r in rejects.reason)),
        "duplicates_removed": dup["exact"] + dup["near"], "duplicates": dup, "dataset_hash": dataset_hash(good),
        "seconds": round(time.time() - t0, 1), "settings": settings, **extra,
    }
    # Write into a temporary folder and move files in place, stats.json last: it marks completion, so a
    # crash mid-write leaves the previous output intact and the next run redoes the work.
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    good[COLUMNS + ["merged_from"]].to_parquet(tmp / "reflections.parquet", index=False)
    rejects.to_parquet(tmp / "rejects.parquet", index=False)
    chunks.to_pandas().to_parquet(tmp / "chunks.parquet", index=False)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    for name in ("reflections.parquet", "rejects.parquet", "chunks.parquet", "stats.json"):
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    for name, st in steps.items():
        progress(f"[synthesize] {name}: in {st['in']}, out {st['out']}, rejected {st['rejected']}")
    progress(f"[synthesize] wrote {len(good)} reflections to {out / 'reflections.parquet'} "
             f"(per step: {stats['per_step']}; rejected {len(rejects)} -> {out / 'rejects.parquet'}; "
             f"duplicates removed {stats['duplicates_removed']}) in {stats['seconds']} s")
    return stats


def load_reflections(path: str | Path) -> pd.DataFrame:
    """Read a reflections folder or Parquet file and check it against the contract, naming what is wrong."""
    p = Path(path)
    f = p / "reflections.parquet" if p.is_dir() else p
    if not f.exists():
        raise MemoError(f"--reflections {p}: no reflections.parquet here; run `memo synthesize` first")
    try:
        df = pd.read_parquet(f)
    except Exception as e:
        raise MemoError(f"{f}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("question", "answer", "step") if c not in df.columns]
    if missing:
        raise MemoError(f"{f}: missing column(s) {', '.join(missing)}; expected the reflection columns {', '.join(COLUMNS)}")
    if df.empty:
        raise MemoError(f"{f}: no reflections (0 rows); check the synthesize stage's stats.json")
    return df
