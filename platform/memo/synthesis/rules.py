"""The offline `rules` GENERATOR: the method's synthesis steps without an LLM.

  direct        questions on a sentence's names, numbers, years and dates, fronted and cloze forms;
  indirect      the same fact from another angle: the relation asked in the other direction ("was founded
                by Y" -> "Who founded X?") and the verb replaced by a common synonym;
  entity        the sentence's subject described without naming it (against the reversal curse);
  consolidated  per document, what is known about its main entity (>= 3 facts);
  cross_doc     converging clues and bridge questions over entities shared by 2+ documents, grouped
                from the corpus alone (shared names; no gold evidence sets);
and the verification step as rule checks with one rewrite (resolve a leading pronoun, absolute dates).
Every pair's answer is a verbatim, self-contained corpus sentence, so nothing is invented. The grammar
lives in `synthesis.questions`; abstention rows are added by the stage for every generator.
"""

from __future__ import annotations

import itertools
import logging
import re

import pandas as pd

from memo.synthesis.questions import (
    _head,
    _with_article,
    active_agent,
    check_self_contained,
    cloze,
    describe,
    fronted,
    is_modifier,
    resolved_sentences,
    with_synonym,
    wordings,
)
from memo.synthesis.relations import main_entity, relation_questions, restate_full_name
from memo.synthesis.schema import COLUMNS, GeneratorOutput, reject_frame, stable_id
from memo.text import find_spans, lower_words

log = logging.getLogger(__name__)
# Part of the resume key: a change to the rules' questions re-synthesizes instead of reusing old output.
RULES_VERSION = "rules-2"  # 2: pronouns resolved in untitled documents, common words opening a sentence
# The same for the extra wordings of synthesize.phrasings >= 3 (at 2 the output is rules-1's, byte for
# byte): bump it with every change to them. Unbumped, the possessive relation questions (87908ed) reused
# reflections made before them under the same key, and a lever measurement trained on the old wordings.
WORDINGS_VERSION = "wordings-3"  # 3: appositions asked in every sentence


def _row(domain, step, question, answer, chunk_ids, verified=True):
    return {"id": stable_id(domain, question), "domain": domain, "step": step, "question": question,
            "answer": answer, "source_chunk_ids": list(chunk_ids), "generator": "rules", "verified": verified}


def _reject(domain, step, question, answer, chunk_ids, reason):
    return {**_row(domain, step, question, answer, chunk_ids, verified=False), "reason": reason}


def chunk_sentences(chunk: dict, full_names: bool = False) -> list[str]:
    """A chunk's sentences after the rewrite step; sentences that still fail are returned as-is and rejected
    later. full_names: the document subject's last name alone becomes the full name."""
    out = resolved_sentences(chunk["text"], chunk["title"], chunk["doc_date"])
    return [restate_full_name(s, chunk["title"]) for s in out] if full_names else out


def subject_question(sentence: str, subject: dict) -> str:
    """The sentence asked about its subject: "Who or what leads the Ketterline Lab?"; a possessive subject
    is asked with "whose" ("Frankie Ryan's friend Jeff works ..." -> "Whose friend Jeff works ...?")."""
    q = cloze(sentence, subject)
    if subject["text"].endswith("'s"):
        return re.sub(r"^What(?:'s)? ", "Whose ", q, count=1)
    return q.replace("What ", "Who or what ", 1)


def synthesize_chunk(chunk: dict, max_direct_per_sentence: int = 1, phrasings: int = 2,
                     answer_form: str = "sentence") -> tuple[list[dict], list[dict]]:
    """Steps direct, entity, consolidated for one chunk; returns (reflections, rejects).

    phrasings <= 2 asks a sentence's main fact two ways and its other facts once; more asks every fact
    up to `phrasings` ways (`questions.wordings`), the subject from the object's side with each synonym
    verb too (the reversal curse: a direction never trained is not recalled), the relations it states as
    knowledge bases name them (`relations`, appositions in every sentence), and restates the document
    subject's full name. answer_form=short_first puts the asked name, number or date before the
    sentence ("Natalie Wood. The film stars ...")."""
    domain, cid = chunk["domain"], chunk["chunk_id"]
    out, rejects = [], []

    def add(step, q, a, short=None, ids=(cid,)):
        problem = check_self_contained(q, a)
        if not problem and answer_form == "short_first" and short and short.strip(" .") != a.strip(" ."):
            a = f"{short.rstrip('.')}. {a}"
        (rejects.append(_reject(domain, step, q, a, ids, problem)) if problem else out.append(_row(domain, step, q, a, ids)))

    many = phrasings > 2
    sentences = chunk_sentences(chunk, full_names=many)
    facts_about: dict[str, list[str]] = {}
    title_entity = main_entity(chunk["title"])
    common = lower_words(chunk["text"])
    for s in sentences:
        spans = find_spans(s, common)
        if not spans:
            rejects.append(_reject(domain, "direct", "", s, [cid], "no name, number or date to ask about"))
            continue
        subject = spans[0] if spans[0]["kind"] == "name" and _with_article(s, spans[0])[0] == 0 else None
        if many:  # the relation in the words knowledge bases (and executives) name it, both sides if symmetric
            entity = title_entity if title_entity and title_entity in s else subject and subject["text"]
            for q, _, answer in relation_questions(s, entity or None):
                add("indirect", q, s, answer)
        if subject:
            facts_about.setdefault(subject["text"], []).append(s)
            add("entity", subject_question(s, subject), s, subject["text"])
            if many:
                for k in range(2):
                    reworded = with_synonym(s, subject, k)
                    if reworded:
                        add("entity", subject_question(reworded, subject), s, subject["text"])
        # Prefer numbers, dates and the last names: they carry the facts users ask about.
        targets = [sp for sp in spans if sp is not subject]
        targets.sort(key=lambda sp: (["number", "date", "year", "name"].index(sp["kind"]), -sp["start"]))
        for k, sp in enumerate(targets[:max_direct_per_sentence]):
            if many:
                for n, q in enumerate(wordings(s, subject, sp, phrasings)):
                    add("direct" if n == 0 else "indirect", q, s, sp["text"])
                continue
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
                add("direct", asked[0], s, sp["text"])
                add("indirect", synonym_q, s, sp["text"])
            else:
                for q in asked[:2 if k == 0 else 1]:
                    add("direct", q, s, sp["text"])
        agent = subject and next((sp for sp in targets if sp["kind"] == "name" and active_agent(s, subject, sp)), None)
        if agent:
            add("indirect", active_agent(s, subject, agent), s, agent["text"])
            for k in range(2 if many else 1):
                reworded = with_synonym(s, subject, k)
                span = reworded and next((x for x in find_spans(reworded) if x["text"] == agent["text"]), None)
                q = span and active_agent(reworded, subject, span)
                if q:
                    add("indirect", q, s, agent["text"])
    for entity, facts in facts_about.items():
        if len(facts) >= 3:
            head = _head(entity)
            article = "the " if head else ""
            add("consolidated", f"What is known about {article}{entity}?", " ".join(facts[:4]))
    return out, rejects


def synthesize_batch(batch: pd.DataFrame, max_direct_per_sentence: int = 1, phrasings: int = 2,
                     answer_form: str = "sentence") -> pd.DataFrame:
    """Ray Data `map_batches` body: chunks in, reflection rows out (rejects flagged by a non-empty reason)."""
    rows = []
    for chunk in batch.to_dict("records"):
        good, bad = synthesize_chunk(chunk, max_direct_per_sentence, phrasings, answer_form)
        rows += [{**r, "reason": ""} for r in good] + bad
    return pd.DataFrame(rows, columns=COLUMNS + ["reason"])


def entity_mentions(chunk: dict) -> list[dict]:
    """Ray Data `flat_map` body: one row per (name, sentence), the input of cross-document grouping."""
    rows, common = [], lower_words(chunk["text"])
    for i, s in enumerate(chunk_sentences(chunk)):
        for sp in find_spans(s, common):
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


class RulesGenerator:
    """Per-chunk tasks on Ray Data, then cross-document groups by shared names (map_groups)."""
    name = "rules"

    def __init__(self, phrasings: int = 2, answer_form: str = "sentence"):
        self.version = (RULES_VERSION + (f"+{WORDINGS_VERSION}" if phrasings > 2 else "")
                        + ("+short-1" if answer_form == "short_first" else ""))

    def run(self, cfg, chunks, out, key) -> GeneratorOutput:
        local = chunks.map_batches(synthesize_batch, batch_format="pandas", batch_size=16,
                                   fn_kwargs={"max_direct_per_sentence": cfg.max_direct_per_sentence,
                                              "phrasings": cfg.phrasings, "answer_form": cfg.answer_form}).to_pandas()
        log.info(f"[synthesize] per-chunk steps: {int((local.reason == '').sum())} pairs, "
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
        log.info(f"[synthesize] cross-document step: {len(cross)} pairs over "
                 f"{len({tuple(x) for x in cross['source_chunk_ids']})} chunk pairs, from {groups} names shared "
                 "by 2+ documents")
        allrows = pd.concat([local, cross], ignore_index=True)
        steps = {"per_chunk": {"in": chunks.count(), "out": int((local.reason == "").sum()),
                               "rejected": int((local.reason != "").sum())},
                 "cross_doc": {"in": groups, "out": int((cross.reason == "").sum()),
                               "rejected": int((cross.reason != "").sum())}}
        return GeneratorOutput(
            pairs=allrows[allrows.reason == ""].drop(columns=["reason"]).reset_index(drop=True),
            rejects=reject_frame(allrows[allrows.reason != ""], cfg.domain, self.name), steps=steps,
            groups={"by_method": {"entities": groups}, "groups": groups,
                    "note": "one group per name shared by 2+ documents"})
