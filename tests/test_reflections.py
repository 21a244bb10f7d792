import json

import pandas as pd
import pytest
from memo.config import SynthesizeConfig, build_config
from memo.errors import MemoError
from memo.synthesis import load_reflections, synthesize
from memo.synthesis.questions import check_self_contained, cloze, resolved_sentences, rewrite_sentence
from memo.synthesis.rules import cross_doc_group, entity_mentions, synthesize_chunk
from memo.synthesis.schema import COLUMNS, stable_id
from memo.text import IDK_ANSWER, find_spans


def chunk(text, doc_id="d1", title="The Halvenmere Cooperative", date="2021-03-04"):
    return {"domain": "t", "doc_id": doc_id, "chunk_id": f"{doc_id}#0", "title": title, "text": text,
            "doc_date": date, "source": "s", "sha256": ""}


def test_spans_find_names_numbers_years_dates():
    s = "The Glimmerfield Division hired 138 engineers in 1992 and opened on March 4, 2019 in Skarreth Point."
    kinds = [(sp["kind"], sp["text"]) for sp in find_spans(s)]
    assert ("name", "Glimmerfield Division") in kinds
    assert ("number", "138 engineers") in kinds
    assert ("year", "1992") in kinds
    assert ("date", "March 4, 2019") in kinds
    assert ("name", "Skarreth Point") in kinds
    assert ("name", "The") not in kinds and ("name", "March") not in kinds


def test_cloze_questions_ask_for_the_masked_fact():
    s = "The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen."
    spans = {sp["text"]: sp for sp in find_spans(s)}
    assert cloze(s, spans["1987"]) == "The Halvenmere Cooperative was founded in which year by Ysolde Marrowfen?"
    assert cloze(s, spans["Ysolde Marrowfen"]) == "The Halvenmere Cooperative was founded in 1987 by whom?"
    assert cloze(s, spans["Halvenmere Cooperative"]) == "Which cooperative was founded in 1987 by Ysolde Marrowfen?"


def test_chunk_steps_answer_with_the_source_sentence():
    text = ("The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen. "
            "The Halvenmere Cooperative has headquarters in Velmora. "
            "The Halvenmere Cooperative employs 412 researchers.")
    good, bad = synthesize_chunk(chunk(text))
    assert not bad
    steps = {r["step"] for r in good}
    assert steps == {"direct", "indirect", "entity", "consolidated"}
    for r in good:
        assert set(r) == set(COLUMNS)
        assert r["source_chunk_ids"] == ["d1#0"] and r["verified"] is True
        if r["step"] != "consolidated":
            assert r["answer"] in text  # answers are verbatim corpus sentences: nothing invented
    assert any(r["question"] == "Which cooperative has headquarters in Velmora?" for r in good)
    # both directions of the founding relation, and the verb reworded
    indirect = {r["question"] for r in good if r["step"] == "indirect"}
    assert {"Who founded the Halvenmere Cooperative in 1987?", "Who started the Halvenmere Cooperative in 1987?",
            "How many researchers does the Halvenmere Cooperative have on staff?"} <= indirect


def test_fronted_synonym_and_agent_questions_stay_grammatical():
    from memo.synthesis.questions import active_agent, fronted, with_synonym
    s = "The Amberlin Prize is awarded by the Velmora Maritime Society."
    sp = {x["text"]: x for x in find_spans(s)}
    assert active_agent(s, sp["Amberlin Prize"], sp["Velmora Maritime Society"]) == "Which society awards the Amberlin Prize?"
    s = "Each Corvane Cell weighs 36 kilograms."
    sp = {x["text"]: x for x in find_spans(s)}
    assert fronted(s, sp["Corvane Cell"], sp["36 kilograms"]) == "How many kilograms does each Corvane Cell weigh?"
    s = "Wenna Ostrocliff leads the Ketterline Lab."
    sp = {x["text"]: x for x in find_spans(s)}
    assert with_synonym(s, sp["Wenna Ostrocliff"]) == "Wenna Ostrocliff heads the Ketterline Lab."
    s = "The Vessamere Lantern is assembled at the Drossel Yard factory in Ondwick."
    sp = {x["text"]: x for x in find_spans(s)}
    assert fronted(s, sp["Vessamere Lantern"], sp["Drossel Yard"]) is None  # "factory" would be left dangling
    good, _ = synthesize_chunk(chunk("Wenna Ostrocliff spoke at the 2014 Quillstead Tide Summit."))
    assert not any("which year Quillstead" in r["question"] or "2014 which" in r["question"] for r in good)


def test_verification_rewrites_pronouns_and_relative_dates_then_rejects_the_rest():
    assert check_self_contained("Who founded it?", "It was founded.") == "unresolved pronoun"
    assert check_self_contained("What does the document say?", "x") == "reference to the document"
    assert rewrite_sentence("It opened a lab last year.", "The Ketterline Lab", "2021-05-01") == \
        "Ketterline Lab opened a lab in 2020."
    good, bad = synthesize_chunk(chunk("He said the document describes 5 ideas.", title="Orrin Vale"))
    assert not good and len(bad) >= 1
    assert all(b["reason"] for b in bad)


def test_a_story_without_a_title_resolves_pronouns_only_to_the_character_the_sentence_before_opened_with():
    """A story summary (NarrativeQA's documents have no title): "He" is the character the sentence before
    opened with, "They" a pair; an apposition makes it ambiguous, "It turns out" is no pronoun at all,
    and a capitalised common word opening a sentence is no name to ask about."""
    text = ("Station producer Farrell argued with Rita at the station. He asks Frankie to keep quiet. "
            "Police detectives Marty Phillips and Delaney suspect a singer, Tex Barton, who slipped out. "
            "He was in the audience. Frankie finds the weapon in a ventilator duct. "
            "It turns out the gun belongs to Tex. Landon and Jamie rehearse at the station. "
            "They get to know each other. Later, Tex is found dead and the police arrest Farrell. "
            "It was raining in Hollywood. Landon visits Farrell.")
    s = resolved_sentences(text, "", "")
    assert s[1] == "Farrell asks Frankie to keep quiet."
    assert s[3] == "He was in the audience."  # Tex Barton in apposition: either could be meant
    assert s[5] == "The gun belongs to Tex."
    assert s[7] == "Landon and Jamie get to know each other."
    assert s[9] == "It was raining in Hollywood."  # "it" in a story: a thing, the weather, not a character
    good, bad = synthesize_chunk(chunk(text, title=""))
    qs = [r["question"] for r in good]
    assert "Who or what asks Frankie to keep quiet?" in qs
    assert not [q for q in qs if q.startswith(("Who or what producer", "Who or what detectives", "What, Tex"))], qs
    assert not {r["answer"] for r in good} & {s[3], s[9]}  # never asked with a guessed subject
    assert [b["reason"] for b in bad if b["answer"] == s[9]] == ["unresolved pronoun"]
    # a titled document keeps resolving to its subject
    assert rewrite_sentence("He asks Frankie.", "Orrin Vale", "") == "Orrin Vale asks Frankie."


def test_cross_doc_groups_by_shared_entity_and_bridges_documents():
    a = chunk("The Glimmerfield Division designs the Vessamere Lantern.", "doc-a")
    b = chunk("The Vessamere Lantern is assembled in Ondwick.", "doc-b")
    mentions = pd.DataFrame(entity_mentions(a) + entity_mentions(b))
    group = mentions[mentions.entity == "Vessamere Lantern"]
    rows = cross_doc_group(group)
    qs = list(rows.question)
    assert "The lantern that the Glimmerfield Division designs is assembled where?" in qs
    assert any(q.startswith("Which is the lantern that") for q in qs)
    assert all(set(r) == {"doc-a#0", "doc-b#0"} for r in rows.source_chunk_ids)
    assert all("Ondwick" in ans and "Glimmerfield" in ans for ans in rows.answer)
    # a name in one document only forms no group
    assert cross_doc_group(mentions[mentions.entity == "Ondwick"]).empty
    # a mention inside a list gives no garbled description
    c = chunk("The Halvenmere Cooperative operates the Glimmerfield Division, the Saltmarrow Works and the Ketterline Lab.", "doc-c")
    d = chunk("The Saltmarrow Works is based in Quillstead.", "doc-d")
    m2 = pd.DataFrame(entity_mentions(c) + entity_mentions(d))
    assert cross_doc_group(m2[m2.entity == "Saltmarrow Works"]).empty


def test_stable_id_ignores_case_and_punctuation():
    assert stable_id("d", "Who founded X?") == stable_id("d", "who founded x")
    assert stable_id("d", "Who founded X?") != stable_id("e", "Who founded X?")


def test_synthesize_with_ray_writes_the_contract_and_reruns_do_nothing(ray_local, tmp_path, capsys):
    from conftest import DEMO_CORPUS

    cfg = build_config(SynthesizeConfig, {"domain": "demo", "corpus": str(DEMO_CORPUS), "out": str(tmp_path / "r")})
    stats = synthesize(cfg)
    df = pd.read_parquet(tmp_path / "r" / "reflections.parquet")
    assert list(df.columns) == COLUMNS + ["merged_from"]  # the contract, plus consolidation lineage
    assert len(df) == stats["rows"] and df.id.is_unique
    for step in ("direct", "entity", "consolidated", "cross_doc", "abstain"):
        assert stats["per_step"][step] > 0, step
    assert (df[df.step == "abstain"].answer == IDK_ANSWER).all()
    # abstention questions name something the corpus never mentions
    corpus = DEMO_CORPUS.read_text().lower()
    for q in df[df.step == "abstain"].question:
        assert any(sp["text"].split()[0].lower() not in corpus for sp in find_spans(q) if sp["kind"] == "name")
    chunks = set(pd.read_parquet(tmp_path / "r" / "chunks.parquet").chunk_id)
    assert all(set(ids) <= chunks for ids in df.source_chunk_ids)
    assert json.loads((tmp_path / "r" / "stats.json").read_text())["dataset_hash"] == stats["dataset_hash"]

    mtime = (tmp_path / "r" / "reflections.parquet").stat().st_mtime_ns
    capsys.readouterr()
    again = synthesize(cfg)
    assert again == stats and "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "r" / "reflections.parquet").stat().st_mtime_ns == mtime


def test_load_reflections_errors(tmp_path):
    with pytest.raises(MemoError, match="no reflections.parquet here"):
        load_reflections(tmp_path)
    pd.DataFrame({"question": ["q"]}).to_parquet(tmp_path / "reflections.parquet")
    with pytest.raises(MemoError, match="missing column"):
        load_reflections(tmp_path)
    pd.DataFrame({"question": [], "answer": [], "step": []}).to_parquet(tmp_path / "reflections.parquet")
    with pytest.raises(MemoError, match="0 rows"):
        load_reflections(tmp_path)


@pytest.mark.parametrize("sentence, target, question", [
    ("The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen.", "Ysolde Marrowfen",
     "By whom was the Halvenmere Cooperative founded in 1987?"),
    ("The Glimmerfield Division has 138 staff members.", "138 staff", "How many staff members does the Glimmerfield Division have?"),
    ("Tobiah Quenlark became director of the Glimmerfield Division in 2005.", "2005",
     "When did Tobiah Quenlark become director of the Glimmerfield Division?"),
    ("Wenna Ostrocliff designed the Thistlewire Relay.", "Thistlewire Relay", "Which relay did Wenna Ostrocliff design?"),
    ("The Glimmerfield Division is based in Skarreth Point.", "Skarreth Point", "Where is the Glimmerfield Division based?"),
    # list items and present perfect have no clean fronted form: the cloze question is used instead
    ("The Cooperative operates the Glimmer Division, the Salt Works and the Ketter Lab.", "Ketter Lab", None),
    ("The Vessamere Lantern has used the Corvane Cell since 2013.", "2013", None),
])
def test_fronted_questions_use_the_word_order_people_ask_in(sentence, target, question):
    from memo.synthesis.questions import fronted

    spans = find_spans(sentence)
    t = next(sp for sp in spans if sp["text"] == target)
    assert fronted(sentence, spans[0], t) == question


def test_a_one_document_corpus_synthesizes_without_cross_document_pairs(tmp_path, ray_local):
    """Regression: a corpus with no entity shared by two chunks (one NarrativeQA summary) crashed."""
    from memo.config import SynthesizeConfig
    from memo.synthesis import synthesize

    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "title": "Orlen", "text": "The Orlen Hook Academy was founded in 1902 "
                                  "by Wenna Ostrocliff. The academy teaches tidal chemistry."}) + "\n")
    out = synthesize(SynthesizeConfig(domain="one", corpus=str(corpus), out=str(tmp_path / "r"), chunk_words=40))
    assert out["rows"] > 0 and out["per_step"].get("cross_doc", 0) == 0


def test_unknown_relations_of_known_entities_are_answered_i_dont_know():
    from memo.synthesis.abstain import unknown_relation_rows

    docs = ["Mara Quill founded the Orrin Light in 1990.", "The Orrin Light employs Tess Vane as its keeper.",
            "Ivo Lark founded the Harlow Guild.", "Ivo Lark and Tess Vane met at the Harlow Guild."]
    refl = pd.DataFrame([
        {"step": "direct", "question": "Which lighthouse did Mara Quill found?", "answer": docs[0], "source_chunk_ids": ["a"]},
        {"step": "direct", "question": "Who does Tess Vane work for?", "answer": docs[1], "source_chunk_ids": ["b"]},
        {"step": "direct", "question": "What did Ivo Lark found?", "answer": docs[2], "source_chunk_ids": ["c"]}])
    out = unknown_relation_rows(refl, docs, 0.99, "d", "rules")
    assert (out.answer == IDK_ANSWER).all() and (out.step == "abstain").all()
    # Tess Vane founded nothing and Mara Quill works for no one, as far as the corpus says; but founding
    # is never re-asked of Ivo Lark, whose document states it
    assert set(out.question) <= {"Which lighthouse did Tess Vane found?", "Who does Mara Quill work for?",
                                 "Who does Ivo Lark work for?", "What did Tess Vane found?"} and len(out) >= 2
    # "founded" in the text states "found": neither Mara Quill nor Ivo Lark is asked it
    assert not any(f"{who} found" in q for q in out.question for who in ("Ivo Lark", "Mara Quill"))
    assert unknown_relation_rows(refl, docs, 0.0, "d", "rules").empty


def test_an_option_added_later_keeps_earlier_outputs_reusable_at_its_default():
    from memo.config import resume_key

    base = build_config(SynthesizeConfig, {"domain": "d", "corpus": "-"})
    assert "abstain_relations" not in base.output_fields()  # at its default: the key of a run made before it
    on = base.model_copy(update={"abstain_relations": 0.1})
    assert on.output_fields()["abstain_relations"] == 0.1
    assert resume_key(base, version="v") != resume_key(on, version="v")
    # grounding came after evaluations made under the guard (strict): those keep their key, the new
    # default (facts) is another run
    from memo.config import ExecutiveConfig
    assert "grounding" not in ExecutiveConfig(grounding="strict").output_fields()
    assert ExecutiveConfig().output_fields()["grounding"] == "facts"


def test_the_extra_wordings_carry_their_own_code_version_into_the_resume_key():
    """phrasings >= 3 runs code that phrasings=2 never does: a change to it must re-synthesize those outputs
    (unversioned, reflections made before the possessive relation questions were reused under the same key),
    and must leave the default's outputs reusable."""
    from memo.synthesis.rules import RULES_VERSION, WORDINGS_VERSION
    from memo.synthesis.stage import make_generator

    version = {k: make_generator(build_config(SynthesizeConfig, {"domain": "d", "corpus": "-", "phrasings": k})).version
               for k in (2, 3, 5)}
    assert version[2] == RULES_VERSION
    assert version[3] == version[5] == f"{RULES_VERSION}+{WORDINGS_VERSION}"
    short = make_generator(build_config(SynthesizeConfig, {"domain": "d", "corpus": "-", "answer_form": "short_first"}))
    assert short.version == f"{RULES_VERSION}+short-1"
    with pytest.raises(MemoError, match="answer_form=short_first shapes the rules generator's answers"):
        build_config(SynthesizeConfig, {"domain": "d", "corpus": "-", "answer_form": "short_first",
                                        "generator": "http", "base_url": "http://127.0.0.1:1/v1", "model": "m"})


def test_phrasings_ask_every_fact_many_ways_and_from_both_sides():
    """synthesize.phrasings=5: each fact in up to 5 different questions (fronted, cloze, synonym verbs, other
    question words), the founder asked from the company's side and the company from the founder's, every
    answer still the verbatim sentence; phrasings=2 keeps today's output unchanged."""
    s = "The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen."
    text = s + " The Halvenmere Cooperative has headquarters in Velmora."
    two, _ = synthesize_chunk(chunk(text), max_direct_per_sentence=2)
    assert synthesize_chunk(chunk(text), max_direct_per_sentence=2, phrasings=2)[0] == two
    five, bad = synthesize_chunk(chunk(text), max_direct_per_sentence=2, phrasings=5)
    assert not bad and len(five) > len(two)
    year = [r["question"] for r in five if r["answer"] == s and r["step"] in ("direct", "indirect") and "1987" not in r["question"]
            and "Marrowfen?" in r["question"] + "Marrowfen?" and ("year" in r["question"] or r["question"].startswith("When"))]
    assert len(set(year)) == 5, year
    assert {"When was the Halvenmere Cooperative founded by Ysolde Marrowfen?",
            "In which year was the Halvenmere Cooperative founded by Ysolde Marrowfen?",
            "When was the Halvenmere Cooperative started by Ysolde Marrowfen?"} <= set(year)
    questions = {r["question"] for r in five}
    assert {"Who founded the Halvenmere Cooperative in 1987?", "Who established the Halvenmere Cooperative in 1987?",
            "Which cooperative was established in 1987 by Ysolde Marrowfen?"} <= questions  # both directions
    assert all(r["answer"] in text for r in five if r["step"] != "consolidated")
    assert len({r["id"] for r in five}) == len(five)


def test_fact_statements_are_the_corpus_sentences_standing_alone():
    from memo.training.fact_text import fact_statements

    chunks = pd.DataFrame([chunk("The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen. It has "
                                 "headquarters in Velmora. This document describes the cooperative. Nothing more.")])
    assert fact_statements(chunks) == ["The Halvenmere Cooperative was founded in 1987 by Ysolde Marrowfen.",
                                       "Halvenmere Cooperative has headquarters in Velmora."]


def test_relations_are_asked_as_knowledge_bases_name_them_from_both_sides():
    from memo.synthesis.relations import relation_questions, restate_full_name

    s = "Anna Benson is an American model and ex-wife of former Major League Baseball pitcher Kris Benson."
    assert relation_questions(s, "Anna Benson") == [("Who or what is Anna Benson's spouse?", "spouse", "Kris Benson"),
                                                    ("Who or what is Kris Benson's spouse?", "spouse", "Anna Benson")]
    s = "A highly touted prospect, Benson was drafted first overall by the Pittsburgh Pirates in 1996."
    full = restate_full_name(s, "Kris Benson")
    assert full == s.replace("Benson", "Kris Benson")
    assert relation_questions(full, "Kris Benson") == [("Who or what is Kris Benson's member of sports team?",
                                                        "member of sports team", "Pittsburgh Pirates")]
    # an apposition states a symmetric relation between two names, asked of both, whatever the sentence is
    # about (MuSiQue's "The film stars ..., with an early screen appearance from Lana Wood, the sister of
    # Natalie Wood." has no named subject)
    film = "The film has an early appearance from Lana Wood, the sister of Natalie Wood."
    both = {(q, a) for q, _, a in relation_questions(film, None)}
    assert both >= {("Who or what is Lana Wood's sibling?", "Natalie Wood"),
                    ("Who or what is Natalie Wood's sibling?", "Lana Wood")}
    good, _ = synthesize_chunk(chunk(film, title="Gypsy"), max_direct_per_sentence=2, phrasings=5)
    assert {"Who or what is Natalie Wood's sibling?", "Who or what is Lana Wood's sibling?"} <= {r["question"] for r in good}
    # answer_form=short_first: the asked name first, then the sentence; the sentence alone by default
    short, _ = synthesize_chunk(chunk(film, title="Gypsy"), max_direct_per_sentence=2, phrasings=5,
                                answer_form="short_first")
    answers = {r["question"]: r["answer"] for r in short}
    assert answers["Who or what is Natalie Wood's sibling?"] == f"Lana Wood. {film}"
    assert all(r["answer"] == film for r in good)
    assert all(r["answer"].endswith(film) and r["answer"] != film for r in short if r["step"] != "consolidated")
    assert restate_full_name("Anna Benson met Benson.", "Kris Benson") == "Anna Benson met Kris Benson."
    # the relation belongs to another name in the sentence: nothing is asked of the entity
    assert relation_questions("Roosevelt had served as president, and Taft had won the election.", "Roosevelt") == []
    good, _ = synthesize_chunk(chunk(s, title="Kris Benson"), max_direct_per_sentence=2, phrasings=5)
    asked = {r["question"]: r["answer"] for r in good}
    assert asked["Who or what is Kris Benson's member of sports team?"] == full
