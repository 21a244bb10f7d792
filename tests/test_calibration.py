"""The memory's abstention threshold: chosen on held-out rewordings and invented-entity twins, reported as
AUROC and selective accuracy, applied as "I don't know" with the raw answer kept in the trace."""

from memo.engines.base import Reply, confidence
from memo.executive.clients import gated
from memo.executive.trace import Trace, ask_and_record
from memo.text import IDK_ANSWER
from memo.training.calibration import auroc, calibrate, choose_threshold, selective


def test_confidence_is_the_geometric_mean_token_probability():
    assert confidence([]) is None
    assert confidence([0.0, 0.0]) == 1.0
    assert abs(confidence([-0.5, -1.5]) - 0.3679) < 1e-4  # exp(-1)


def test_auroc_threshold_and_selective_accuracy():
    scores = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2]
    labels = [True, True, False, True, False, False]
    assert auroc(scores, labels) == round(8 / 9, 4)
    assert auroc(scores, [True] * 6) is None  # nothing to tell apart
    t = choose_threshold(scores, labels)
    assert t in (0.4, 0.8)  # both decide 5 of 6 right; keeping everything decides 3
    sel = selective(scores, labels, 0.4)
    assert sel == {"coverage": 0.6667, "selective_accuracy": 0.75, "accuracy_all": 0.5}
    assert choose_threshold([0.9, 0.8], [True, True]) == 0.0  # abstaining gains nothing: keep all


class ScriptedMemory:
    """Replies scripted per question (a test of the calibration's bookkeeping, not of a model)."""

    def __init__(self, replies: dict):
        self.replies = replies
        self.asked: list[str] = []

    def ask(self, questions, max_new_tokens=48, temperature=0.0):
        self.asked += questions
        return [self.replies.get(q, Reply("Mara Quill founded it.", confidence=0.3)) for q in questions]


def test_calibration_asks_rewordings_and_invented_twins_and_separates_right_from_wrong():
    heldout = [{"question": f"Who started the Orrin Light {i}?", "answer": f"Mara Quill {i} started it."}
               for i in range(4)]
    replies = {r["question"]: Reply(r["answer"], confidence=0.9) for r in heldout[:3]}
    replies[heldout[3]["question"]] = Reply("Ivo Lark started it.", confidence=0.35)  # wrong, unsure
    memory = ScriptedMemory(replies)
    out = calibrate(memory, heldout, corpus_text="Mara Quill started the Orrin Light.")
    twins = memory.asked[4:]
    assert len(twins) == 4 and all("Orrin" not in q and "?" in q for q in twins)  # the same questions, invented names
    # the twins' confident-looking but low-probability answers (0.3) and the wrong 0.35 fall below it
    assert 0.35 < out["abstain_threshold"] <= 0.9
    assert out["confidence_auroc"] == 1.0 and out["calibration_selective_accuracy"] == 1.0
    assert out["calibration_n"] == 8 and out["calibration_coverage"] == round(3 / 8, 4)


def test_a_gated_answer_is_i_dont_know_and_the_trace_keeps_what_the_memory_said():
    assert gated("Mara Quill.", 0.2, 0.5) == {"answer": IDK_ANSWER, "raw_answer": "Mara Quill.", "confidence": 0.2,
                                              "below_threshold": 0.5}
    assert gated("Mara Quill.", 0.7, 0.5) == {"answer": "Mara Quill.", "confidence": 0.7}
    assert gated("Mara Quill.", 0.2, None)["answer"] == "Mara Quill."  # no threshold, no gate
    assert gated(IDK_ANSWER, 0.2, 0.5)["answer"] == IDK_ANSWER and "raw_answer" not in gated(IDK_ANSWER, 0.2, 0.5)

    class Detailed:
        def ask_detailed(self, questions):
            return [gated("Mara Quill.", 0.2, 0.5) for _ in questions]

    tr = Trace("Who keeps the Orrin Light?")
    assert ask_and_record(tr, Detailed(), ["Who keeps the Orrin Light?"], turn=1) == [IDK_ANSWER]
    step = tr.steps[0]
    assert step["raw_answer"] == "Mara Quill." and step["confidence"] == 0.2 and step["turn"] == 1


def test_no_threshold_is_learnt_from_answers_that_are_all_wrong():
    heldout = [{"question": f"Who started the Orrin Light {i}?", "answer": f"Mara Quill {i} started it."} for i in range(3)]
    out = calibrate(ScriptedMemory({}), heldout, corpus_text="")
    assert out["abstain_threshold"] is None and out["calibration_accuracy_all"] == 0.0
