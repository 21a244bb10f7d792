"""Executive protocol logic with scripted replies (parsing and control flow only; the real models
are exercised in test_e2e.py and test_real_model.py)."""

from collections import Counter

from memo.config import ExecutiveConfig
from memo.executive import single_turn
from memo.executive.single import parse_subquestions
from memo.text import is_idk


STRICT = ExecutiveConfig(grounding="strict")  # the guard's own tests


class Scripted:
    def __init__(self, *replies):
        self.replies, self.prompts = list(replies), []

    def complete(self, messages, max_tokens=96, temperature=0.0, json_mode=False):
        self.prompts.append(messages[-1]["content"])
        return self.replies.pop(0)


class Memory:
    """A scripted memory that counts its calls like the real clients do."""

    def __init__(self, answers):
        self.answers, self.asked, self.usage = answers, [], Counter()

    def ask(self, questions):
        self.asked += questions
        self.usage.update(calls=len(questions))
        return [self.answers.get(q, "I don't know.") for q in questions]


def test_parse_subquestions_tolerates_numbering_bullets_and_json():
    text = '1. Who leads the lab?\n- Where is the lab?\n["When was it founded?", "x?"]\nNot a question'
    assert parse_subquestions(text, 5) == ["Who leads the lab?", "Where is the lab?", "When was it founded?"]
    assert parse_subquestions("Who? What is the lab? Where is the lab?", 1) == ["What is the lab?"]
    assert parse_subquestions("", 3) == []


def test_idk_detection():
    assert is_idk("I don't know.") and is_idk("i do not know") and is_idk("  ")
    assert not is_idk("Wenna Ostrocliff leads the Ketterline Lab.")


def test_single_turn_asks_the_question_and_subquestions_then_answers_from_facts():
    q = "Where is the lab that Wenna leads?"
    exe = Scripted("1. Which lab does Wenna lead?\n2. Where is the Ketterline Lab?", "Velmora")
    mem = Memory({q: "I don't know.", "Which lab does Wenna lead?": "Wenna leads the Ketterline Lab.",
                  "Where is the Ketterline Lab?": "The Ketterline Lab is in Velmora."})
    tr = single_turn(q, exe, mem, max_subquestions=2)
    assert mem.asked == [q, "Which lab does Wenna lead?", "Where is the Ketterline Lab?"]
    assert tr.memory_calls == 3 and tr.answer == "Velmora"
    # IDK answers are not passed to the executive as facts
    assert "I don't know" not in exe.prompts[1] and "Ketterline Lab is in Velmora" in exe.prompts[1]


def test_all_idk_means_idk_without_asking_the_executive_to_guess():
    exe = Scripted("garbage with no questions")
    tr = single_turn("Who is X?", exe, Memory({}))
    assert tr.answer == "I don't know." and len(exe.prompts) == 1


def test_empty_executive_answer_falls_back_to_the_memory_answer():
    exe = Scripted("", "")
    tr = single_turn("Who leads the lab?", exe, Memory({"Who leads the lab?": "Wenna leads the lab."}), STRICT)
    assert tr.answer == "Wenna leads the lab."
    assert tr.steps[-1]["step"] == "fallback"


def test_an_answer_that_adds_no_fact_falls_back_to_the_memory():
    q = "Who is the head of the Ketterline Lab?"
    exe = Scripted("", "The head of the Ketterline Lab is the head of the Ketterline Lab.")
    tr = single_turn(q, exe, Memory({q: "Wenna Ostrocliff leads the Ketterline Lab."}), STRICT)
    assert tr.answer == "Wenna Ostrocliff leads the Ketterline Lab."
    assert tr.steps[-1]["step"] == "fallback"
    exe = Scripted("", "Wenna Ostrocliff.")
    tr = single_turn(q, exe, Memory({q: "Wenna Ostrocliff leads the Ketterline Lab."}), STRICT)
    assert tr.answer == "Wenna Ostrocliff." and tr.steps[-1]["step"] == "answer"


def test_an_answer_that_drops_what_the_memory_said_falls_back_with_a_trace():
    """The memory named the person asked for; a weak executive's rewrite lost it."""
    q = "Who came up with the power cell that the Vessamere Lantern has relied on since 2013?"
    said = "Ilsabet Vornhollow came up with the Corvane Cell."
    exe = Scripted("", "The Corvane Cell has relied on the Vessamere Lantern since 2013.")
    tr = single_turn(q, exe, Memory({q: said}), STRICT)
    assert tr.answer == said
    assert tr.steps[-1]["step"] == "fallback" and "Ilsabet Vornhollow" in tr.steps[-1]["why"]
    # an answer that keeps the memory's facts stands
    exe = Scripted("", "Ilsabet Vornhollow, who invented the Corvane Cell.")
    assert single_turn(q, exe, Memory({q: said}), STRICT).answer == "Ilsabet Vornhollow, who invented the Corvane Cell."


def test_a_chained_subquestion_is_asked_with_the_earlier_answer_put_in():
    q = "Where was the founder of the Halvenmere Cooperative born?"
    exe = Scripted("1. Who founded the Halvenmere Cooperative?\n2. Where was #1 born?\n3. When was #2 founded?",
                   "Dunmore")
    mem = Memory({"Who founded the Halvenmere Cooperative?": "Tobiah Quenlark founded the Halvenmere Cooperative.",
                  "Where was Tobiah Quenlark born?": "Tobiah Quenlark was born in Dunmore."})
    tr = single_turn(q, exe, mem, max_subquestions=3)
    # hop 1 with the question itself, then hop 2 with hop 1's entity, then hop 3 with hop 2's
    assert mem.asked == [q, "Who founded the Halvenmere Cooperative?", "Where was Tobiah Quenlark born?",
                         "When was Dunmore founded?"]
    assert tr.answer == "Dunmore" and "born in Dunmore" in exe.prompts[1]
    chained = [s for s in tr.steps if s.get("chained_from")]
    assert [s["chained_from"] for s in chained] == ["Where was #1 born?", "When was #2 founded?"]


def test_a_chain_stops_where_the_memory_does_not_know():
    exe = Scripted("1. Who founded the Orrin Guild?\n2. Where was #1 born?", "unused")
    mem = Memory({})
    tr = single_turn("Where was the Orrin Guild's founder born?", exe, mem, max_subquestions=2)
    assert mem.asked == ["Where was the Orrin Guild's founder born?", "Who founded the Orrin Guild?"]
    assert tr.answer == "I don't know." and any(s.get("step") == "skip" for s in tr.steps)


def test_grounding_facts_lets_the_answer_stand_and_open_lets_the_executive_use_what_it_knows():
    q = "Who is the head of the Ketterline Lab?"
    wrong = {q: "The Ketterline Lab is the lab of the Ketterline Lab."}  # a memory that echoes
    strict = single_turn(q, Scripted("", "Wenna Ostrocliff"), Memory(wrong), STRICT)
    assert strict.answer == wrong[q]  # the guard hands the user the memory's sentence
    facts = single_turn(q, Scripted("", "Wenna Ostrocliff"), Memory(wrong), ExecutiveConfig(grounding="facts"))
    assert facts.answer == "Wenna Ostrocliff" and facts.steps[-1]["step"] == "answer"
    # open: the notes are offered as possibly wrong, and the executive's own knowledge is allowed
    exe = Scripted("", "Wenna Ostrocliff")
    single_turn(q, exe, Memory(wrong), ExecutiveConfig(grounding="open"))
    assert "may be incomplete" in exe.prompts[-1] and "what you know" in exe.prompts[-1]
    # open, and the memory knows nothing: the executive answers closed-book instead of "I don't know"
    exe = Scripted("", "Wenna Ostrocliff")
    tr = single_turn(q, exe, Memory({}), ExecutiveConfig(grounding="open"))
    assert tr.answer == "Wenna Ostrocliff" and "Notes" not in exe.prompts[-1] and len(exe.prompts) == 2
    assert single_turn(q, Scripted(""), Memory({}), ExecutiveConfig(grounding="facts")).answer == "I don't know."


REWRITE = ExecutiveConfig(chain="rewrite")


def test_rewrite_chain_puts_hop_one_into_hop_two():
    # The executive describes hop 2 instead of writing #1; the rewrite names what hop 1 found.
    q = "Where is the lab that Wenna leads?"
    exe = Scripted("1. Which lab does Wenna lead?\n2. Where is the lab Wenna leads?",
                   "Where is the Ketterline Lab?", "Velmora")
    mem = Memory({"Which lab does Wenna lead?": "Wenna leads the Ketterline Lab.",
                  "Where is the Ketterline Lab?": "The Ketterline Lab is in Velmora."})
    tr = single_turn(q, exe, mem, REWRITE)
    assert mem.asked == [q, "Which lab does Wenna lead?", "Where is the Ketterline Lab?"]
    assert "Wenna leads the Ketterline Lab." in exe.prompts[1] and "Where is the lab Wenna leads?" in exe.prompts[1]
    assert "The Ketterline Lab is in Velmora." in exe.prompts[2] and tr.answer == "Velmora"
    rewrite = [s for s in tr.steps if s.get("step") == "rewrite"]
    assert rewrite[0]["parsed"] == ["Where is the Ketterline Lab?"]
    assert [s for s in tr.steps if s.get("chained_from")][0]["chained_from"] == "Where is the lab Wenna leads?"


def test_rewrite_chain_keeps_the_question_without_facts_or_a_parseable_rewrite():
    q = "Where is the lab that Wenna leads?"
    # hop 1 unknown: nothing to rewrite with, so no executive call; hop 2 asked as written
    exe = Scripted("1. Which lab does Wenna lead?\n2. Where is that lab located?")
    mem = Memory({})
    tr = single_turn(q, exe, mem, REWRITE)
    assert mem.asked == [q, "Which lab does Wenna lead?", "Where is that lab located?"]
    assert len(exe.prompts) == 1 and tr.answer == "I don't know."
    # a rewrite that is not a question: the original stays
    exe = Scripted("1. Which lab does Wenna lead?\n2. Where is that lab located?", "Sure! Here it is.", "Velmora")
    mem = Memory({"Which lab does Wenna lead?": "Wenna leads the Ketterline Lab."})
    single_turn(q, exe, mem, REWRITE)
    assert mem.asked[-1] == "Where is that lab located?"


def test_rewrite_chain_fills_refs_and_skips_what_it_cannot_fill():
    q = "Where was the founder of the company born?"
    exe = Scripted("1. Who founded the company?\n2. Where was #1 born?", "Where was Ysolde Marrowfen born?", "Velmora")
    mem = Memory({"Who founded the company?": "Ysolde Marrowfen founded the company.",
                  "Where was Ysolde Marrowfen born?": "Ysolde Marrowfen was born in Velmora."})
    single_turn(q, exe, mem, REWRITE)
    assert "Next question: Where was Ysolde Marrowfen born?" in exe.prompts[1]
    exe = Scripted("1. Who founded the company?\n2. Where was #1 born?")
    mem = Memory({})
    tr = single_turn(q, exe, mem, REWRITE)
    assert mem.asked == [q, "Who founded the company?"] and tr.steps[-1]["step"] == "skip"


class _Handle:
    """A memory deployment handle whose answers are scripted (what `MemoryModel.answer` returns)."""

    def __init__(self, text: str, confidence: float, threshold: float | None):
        self.out = {"text": text, "confidence": confidence, "abstain_threshold": threshold, "prompt_tokens": 5,
                    "completion_tokens": 3}

    def options(self, **_):
        return self

    @property
    def answer(self):
        return self

    def remote(self, *_):
        out = self.out

        class Response:
            def result(self, timeout_s=None):
                return dict(out)
        return Response()


def test_served_memories_gate_each_memory_by_its_own_threshold_and_keep_the_raw_answer():
    import time

    from memo.serving.executive import ServedMemories

    sure, unsure = _Handle("Quillstead.", 0.9, 0.5), _Handle("Bellhaven.", 0.3, 0.5)
    deadline = time.monotonic() + 30
    gated = ServedMemories([("a", "1", sure), ("b", "2", unsure)], 16, deadline, confidence_gate=True)
    [row] = gated.ask_detailed(["Where was Ysolde Marrowfen born?"])
    assert row["answer"] == "Quillstead." and row["raw_answer"] == "Quillstead. / Bellhaven."
    by_domain = {c["domain"]: c for c in gated.log}
    assert is_idk(by_domain["b"]["answer"]) and by_domain["b"]["raw_answer"] == "Bellhaven."
    assert by_domain["b"]["below_threshold"] == 0.5 and by_domain["a"]["confidence"] == 0.9
    [alone] = ServedMemories([("b", "2", unsure)], 16, deadline, confidence_gate=True).ask_detailed(["Q?"])
    assert is_idk(alone["answer"]) and alone["confidence"] == 0.3 and alone["raw_answer"] == "Bellhaven."
    # without the gate every answer stands, with its confidence in the log
    ungated = ServedMemories([("a", "1", sure), ("b", "2", unsure)], 16, deadline)
    assert ungated.ask(["Q?"]) == ["Quillstead. / Bellhaven."] and ungated.log[1]["confidence"] == 0.3


def test_an_http_memory_reads_the_routers_confidence_and_gates_on_the_served_threshold():
    """HttpMemory against an endpoint speaking the router's wire format (memo_confidence and
    memo_abstain_threshold beside the OpenAI fields)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from memo.executive.clients import HttpMemory

    answers = {"Who founded the Halvenmere Cooperative?": ("Ysolde Marrowfen.", 0.92),
               "Who founded the Larkspur Guild?": ("Ysolde Marrowfen.", 0.41)}

    class Router(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text, conf = answers[req["messages"][-1]["content"]]
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                               "memo_version": "3", "memo_confidence": conf, "memo_abstain_threshold": 0.6,
                               "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-memo-model-version", "3")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        sure, unsure = HttpMemory(url, "demo", confidence_gate=True).ask_detailed(list(answers))
        assert sure == {"answer": "Ysolde Marrowfen.", "confidence": 0.92}
        assert is_idk(unsure["answer"]) and unsure["raw_answer"] == "Ysolde Marrowfen."
        assert unsure["below_threshold"] == 0.6
        assert HttpMemory(url, "demo").ask(list(answers)) == ["Ysolde Marrowfen."] * 2
    finally:
        server.shutdown()
        server.server_close()
