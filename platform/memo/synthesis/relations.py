"""Relational questions: what a sentence states about an entity, asked with the names knowledge bases
give relations ("Who or what is Anna Benson's spouse?"), the words executives and multi-hop
decompositions ask in, and from both sides where the relation reads the same both ways (spouse, sibling).

A fact trained only as a cloze of its sentence is rarely recalled when asked in other words (PAQ:
10% of new questions about trained answers), and a relation trained in one direction is ~0%
retrievable in the other (the reversal curse). The labels are the common person, organisation and work
properties of Wikidata, general English with no tuning to any corpus; each is found by trigger words
between the entity and the other name.
"""

from __future__ import annotations

import re

from memo.synthesis.questions import is_modifier
from memo.text import find_spans

# (relation label, trigger words just before the other name, symmetric): the trigger must sit between
# the entity and the name, at most MAX_GAP words before the name.
RELATIONS: list[tuple[str, str, bool]] = [
    ("spouse", r"wife|husband|ex-wife|ex-husband|widow|widower|married|spouse|consort", True),
    ("sibling", r"sister|brother|half-sister|half-brother|sibling|twin", True),
    ("place of birth", r"born in|born at|native of", False),
    ("place of death", r"died in|died at", False),
    ("educated at", r"studied at|graduated from|educated at|attended|alumnus of|alumna of", False),
    ("employer", r"professor at|lecturer at|worked at|worked for|employed by|taught at|joined", False),
    ("member of sports team", r"played for|drafted .{0,40}by|signed with|signed by|traded to|pitched for", False),
    ("member of political party", r"member of|candidate of|leader of", False),
    ("award received", r"won|awarded|received|recipient of|winner of", False),
    ("founded by", r"founded by|established by|created by", False),
    ("director", r"directed by", False),
    ("author", r"written by|authored by|novel by|book by", False),
    ("performer", r"performed by|sung by|recorded by|starring|stars", False),
    ("headquarters location", r"headquartered in|headquarters in|based in", False),
    ("located in", r"located in|situated in|lies in", False),
]
MAX_GAP = 8
_PARTY = re.compile(r"\bParty\b")


def relation_questions(sentence: str, entity: str | None) -> list[tuple[str, str, str]]:
    """(question, relation, answer) triples for the relations `sentence` states between `entity` (a name in
    it, or None) and a later name, for a symmetric relation the same asked of the other name too, and the
    symmetric relations an apposition states ("Lana Wood, the sister of Natalie Wood") whatever the
    sentence is about. The answer is the other name."""
    at = sentence.find(entity) if entity else -1
    out: list[tuple[str, str, str]] = []
    # The names after the entity that head a noun phrase ("Major League Baseball" in "... Major League
    # Baseball pitcher Kris Benson" modifies "pitcher"); only the first can be the entity's relation.
    names = [sp for sp in find_spans(sentence) if sp["kind"] == "name" and sp["start"] >= at + len(entity)
             and sp["text"] != entity and not is_modifier(sentence, sp)] if at >= 0 else []
    for span in names[:1]:
        gap = sentence[at + len(entity):span["start"]]
        window = " ".join(gap.split()[-MAX_GAP:]).lower()
        for label, triggers, symmetric in RELATIONS:
            if label == "member of political party" and not _PARTY.search(span["text"]):
                continue
            if re.search(rf"\b({triggers})\b", window):
                out += [(q, label, span["text"]) for q in asked(label, entity)]
                if symmetric:
                    out += [(q, label, entity) for q in asked(label, span["text"])]
                break
    # "Lana Wood, the sister of Natalie Wood": an apposition states a symmetric relation between two names
    for m in re.finditer(r"([A-Z][\w.'-]*(?: [A-Z][\w.'-]*)*), (?:the |his |her )?(\w+(?:-\w+)?) of ([A-Z][\w.'-]*(?: [A-Z][\w.'-]*)*)",
                         sentence):
        for label, triggers, symmetric in RELATIONS:
            if symmetric and re.fullmatch(triggers, m.group(2).lower()):
                a, b = m.group(1).rstrip(".,;:"), m.group(3).rstrip(".,;:")
                out += [(q, label, b) for q in asked(label, a)] + [(q, label, a) for q in asked(label, b)]
    return list(dict.fromkeys(out))


def asked(label: str, entity: str) -> list[str]:
    """The relation asked in the possessive ("Who or what is Anna Benson's spouse?"). Not "What is the
    spouse of Anna Benson?": that is how MuSiQue's knowledge-base steps are asked (evaluation.baselines),
    and a probe must not be a training question verbatim."""
    return [f"Who or what is {entity}'s {label}?"]


def main_entity(title: str) -> str:
    """A document's subject from its title: "Miracle on 34th Street (1973 film)" -> "Miracle on 34th Street"."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", title or "").strip()


def restate_full_name(sentence: str, title: str) -> str:
    """The document subject's full name where the sentence uses its last name alone ("Benson was drafted"
    -> "Kris Benson was drafted" in the document "Kris Benson"), so a fact stands alone outside it.
    Another person's name that shares it ("Anna Benson") is left as it is."""
    full = main_entity(title)
    words = full.split()
    if len(words) < 2 or not all(w[:1].isupper() for w in words) or full in sentence:
        return sentence
    last = words[-1]
    out, pos = [], 0
    for m in re.finditer(rf"\b{re.escape(last)}\b", sentence):
        before = sentence[:m.start()].split()
        if before and before[-1][:1].isupper() and not before[-1].endswith((".", ",", ";", ":")):
            continue  # part of another name
        out += [sentence[pos:m.start()], full]
        pos = m.end()
    return "".join(out) + sentence[pos:]
