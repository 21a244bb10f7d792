"""The rules generator's question grammar: cloze and fronted wh-questions, descriptions that name an
entity only through a fact, the relation asked the other way round, synonym verbs, and the rule checks
of the verification step. English by rule, no model; every answer stays a verbatim corpus sentence."""

from __future__ import annotations

import re

from memo.corpus import split_sentences
from memo.text import NOT_NAMES, find_spans, lower_words

_PRONOUN_START = re.compile(r"^(It|He|She|They|This|These|Those|His|Her|Its|Their)\b")
_VAGUE = re.compile(r"\b(the (document|article|text|passage|author)|this (document|article|text|passage))\b", re.I)
_RELATIVE = re.compile(r"\b(last|this|next) year\b", re.I)
# Head nouns that let a description say what kind of thing a name is ("which division ...").
_HEADS = set("""academy agency array association award bank bridge cell center centre college company council
cooperative corporation department division engine festival foundation fund group guild hospital index
institute island lab laboratory lake lantern league library market museum network observatory office
orchestra party port prize program programme project relay river school series society station street
summit system team telescope theatre tower town university valley works""".split())


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


# Other question words for the same question, as people vary them ("When was X founded?" / "In which
# year was X founded?"). Only swaps that keep the grammar by rule; the answer is the same sentence.
_WH_SWAPS = (("When ", ("In which year ", "In what year ")), ("Where ", ("In which place ",)),
             ("Whom ", ("Who ",)), ("On which date ", ("What date ",)), ("How many ", ("What number of ",)))


def other_question_words(question: str, kind: str) -> list[str]:
    """The same question opened with other question words ("When" only becomes a year for a year)."""
    out = []
    for start, swaps in _WH_SWAPS:
        if question.startswith(start) and (start != "When " or kind == "year"):
            out += [alt + question[len(start):] for alt in swaps]
    return out


def wordings(sentence: str, subject: dict | None, target: dict, limit: int) -> list[str]:
    """Up to `limit` different questions asking for `target` in `sentence`, most natural first: the
    fronted question and the cloze, the same with each synonym of the verb, then other question words.
    Allen-Zhu & Li: one wording per fact is extracted ~10% of the time, five varied wordings ~97%."""
    variants = [(sentence, target)]
    if subject:
        for k in range(2):  # SYNONYMS holds two per verb
            reworded = with_synonym(sentence, subject, k)
            span = reworded and next((x for x in find_spans(reworded) if x["text"] == target["text"]), None)
            if span:
                variants.append((reworded, span))
    asked: list[str] = []
    for s, sp in variants:
        asked += [subject and fronted(s, subject, sp), None if is_modifier(s, sp) else cloze(s, sp)]
    asked = [q for q in dict.fromkeys(asked) if q]
    alts = [alt for q in asked for alt in other_question_words(q, target["kind"])]
    # the first question's other question word early (executives vary them), the rest after the synonyms
    return list(dict.fromkeys(asked[:3] + alts[:1] + asked[3:] + alts[1:]))[:limit]


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


def opening_name(sentence: str, common: set[str] = frozenset()) -> str:
    """The name (or "A and B") a sentence opens with, after at most two lower-case descriptor words
    ("Station producer Farrell is afraid ..." -> "Farrell"); '' when it opens otherwise ("After taking
    Grace ...", "When they ..."), or introduces another name in apposition (", Tex Barton, who ..."): a
    pronoun in the next sentence could then mean either."""
    spans = [sp for sp in find_spans(sentence, common) if sp["kind"] == "name" and sp["text"] not in NOT_NAMES]
    if not spans:
        return ""
    before = sentence[:spans[0]["start"]].split()
    if len(before) > 2 or any(w[:1].isupper() and w not in ("The", "A", "An") and w.lower() not in common
                              or w in NOT_NAMES - {"The", "A", "An"} for w in before):
        return ""
    if any(sentence[:sp["start"]].rstrip().endswith(",") and sentence[sp["end"]:].lstrip().startswith(",")
           for sp in spans[1:]):
        return ""
    names = [re.sub(r"'s$", "", sp["text"]) for sp in spans[:2]]
    if len(spans) > 1 and sentence[spans[0]["end"]:spans[1]["start"]] == " and ":
        return " and ".join(names)
    return names[0]


# The pronouns a story's antecedent resolves ("it", "this" there are mostly things or the story itself).
_SINGULAR, _PLURAL = ("He", "She", "His", "Her"), ("They", "Their")
# "It turns out (that) the gun belongs to Tex": no pronoun to resolve, the clause after it states the fact.
_EXPLETIVE = re.compile(r"^It (?:turns out|turned out|seems|seemed|appears|appeared|is revealed|was revealed)"
                        r"(?: that)? ")


def resolved_sentences(text: str, title: str, doc_date: str) -> list[str]:
    """A document's sentences, each rewritten (`rewrite_sentence`) with the name the sentence before
    opened with as the antecedent of a leading pronoun where the document has no title."""
    common, out, antecedent = lower_words(text), [], ""
    for raw in split_sentences(text):
        s = rewrite_sentence(raw, title, doc_date, antecedent)
        # The sentence before only (further back, guesses go wrong), and a name the story uses again
        # ("En route, Aura ..." opens with no character).
        antecedent = opening_name(s, common)
        if antecedent and len(re.findall(rf"\b{re.escape(antecedent.split()[0])}\b", text)) < 2:
            antecedent = ""
        out.append(s)
    return out


def rewrite_sentence(sentence: str, title: str, doc_date: str, antecedent: str = "") -> str:
    """One rewrite attempt: resolve a leading pronoun to the document's subject (its title) or, in a
    document without a title (a story), to `antecedent`, the name the sentence before opened with; relative
    years to absolute. A pronoun is left (and the sentence rejected later) when there is no subject, or
    when the antecedent is named in the sentence itself ("He asks Frankie" after a sentence about Frankie)."""
    if _VAGUE.search(sentence):  # "This article ..." is about the document: no rewrite turns it into a fact
        return sentence
    s, expletive = _EXPLETIVE.subn("", sentence, count=1)
    if expletive and s:
        s = s[0].upper() + s[1:]
    subject = re.sub(r"^(The|A|An) ", "", title).strip()
    m = _PRONOUN_START.search(s)
    if m and not subject and antecedent and antecedent.split()[0] not in s and \
            m.group(1) in (_PLURAL if " and " in antecedent else _SINGULAR):
        subject = antecedent  # a story's character: he/she/his/her for one, they/their for "A and B"
    if subject and m:
        s = _PRONOUN_START.sub(lambda m: subject if m.group(1) in ("It", "He", "She", "They", "This") else
                               subject + "'s", s, count=1)
    year = doc_date[:4] if re.match(r"\d{4}", doc_date or "") else None
    if year:
        s = _RELATIVE.sub(lambda m: f"in {int(year) + {'last': -1, 'this': 0, 'next': 1}[m.group(1).lower()]}", s)
    return s
