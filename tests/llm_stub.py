"""A scripted OpenAI-compatible chat endpoint on 127.0.0.1 for the generator's tests.

It speaks the real wire format (POST /v1/chat/completions, JSON body, `usage`), so the http engine, its
retries and the Ray Data pipeline run for real; only the LLM's replies are scripted, from the prompt:
each synthesis step's prompt gets a well-formed JSON reply built from the text it quotes. A document whose
text contains GARBLE always gets a reply that is not JSON (the malformed row the rejects must catch).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def _field(prompt: str, name: str) -> str:
    m = re.search(rf"^{name}: (.*)$", prompt, re.M)
    return m.group(1).strip() if m else ""


def _body(prompt: str) -> str:
    """The quoted text of a one-document prompt: after the Title/Date header, before the instructions."""
    parts = prompt.split("\n\n")
    return parts[1] if len(parts) > 2 else ""


def scripted_reply(prompt: str) -> str:
    if "GARBLE" in prompt:
        return "Sure! Here are some facts, in prose, with no JSON at all."
    title = _field(prompt, "Title")
    if "states explicitly" in prompt:
        pairs = [{"question": f"What is recorded about {title} in fact {i + 1}?", "answer": s}
                 for i, s in enumerate(_sentences(_body(prompt)))]
        pairs.append({"question": f"What is the name of {title}?", "answer": f"{title}'s name is {title}."})  # an echo
        return "```json\n" + json.dumps({"pairs": pairs}) + "\n```"  # fenced, as chat models often do
    if "two or more sentences of this" in prompt:
        sents = _sentences(_body(prompt))
        return json.dumps({"pairs": [{"question": f"How do the first two facts about {title} connect?",
                                      "answer": " ".join(sents[:2])}]}) + "\n"
    if "Merge pairs that share" in prompt:
        answers = re.findall(r"^p\d+\. Q: .*? A: (.*)$", prompt, re.M)
        return json.dumps({"composites": [{"merged": ["p1", "p2", "p3"][:len(answers)], "question":
                                           f"What three facts are known about {title}?",
                                           "answer": " ".join(answers[:3])},
                                          {"merged": ["p1"], "question": "A one-pair merge that must be rejected?",
                                           "answer": "No."}]})
    if "stand alone for a reader" in prompt:
        q = re.search(r"^Question: (.*)$", prompt, re.M).group(1)
        if "FIXME" in q:
            return json.dumps({"ok": False, "violations": ["vague_reference"]})
        return json.dumps({"ok": True, "violations": []})
    if "fails the stand-alone check" in prompt:
        q = re.search(r"^Question: (.*)$", prompt, re.M).group(1)
        a = re.search(r"^Answer: (.*)$", prompt, re.M).group(1)
        return json.dumps({"question": q.replace("FIXME ", ""), "answer": a})
    if "WITHOUT naming it" in prompt:
        first = _sentences(_body(prompt))[0]
        return json.dumps({"entities": [{"name": title, "questions": [
            {"kind": "one_fact", "question": "Which place " + first.replace(title, "").strip(" .") + "?",
             "answer": f"{title}. {first}"},
            {"kind": "two_facts", "question": f"Which place is {title} again?", "answer": title}]}]})
    if "These documents are related" in prompt:
        titles = re.findall(r"^\[\d+\] Title: (.*)$", prompt, re.M)
        return json.dumps({"questions": [
            {"kind": "converging", "question": f"Which documents link {titles[0]} and {titles[1]}?",
             "answer": f"{titles[0]} and {titles[1]} share a name.", "documents": [1, 2]},
            {"kind": "parallel", "question": f"Which places are like {titles[0]}, by one source only?",
             "answer": "Only one.", "documents": [1]}]})
    return "I do not understand the request."


class StubLLM:
    """`with StubLLM() as llm:` serves on llm.url; llm.requests counts chat calls; `fail_first` makes the
    first N calls answer 500 (to exercise retries), with a Retry-After header when `retry_after` is set;
    `reply` replaces the script."""

    def __init__(self, reply=scripted_reply, fail_first: int = 0, status: int = 500, delay: float = 0.0,
                 retry_after: float | None = None):
        self.reply, self.fail_first, self.status, self.delay = reply, fail_first, status, delay
        self.retry_after = retry_after
        self.requests = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stub.lock:
                    stub.requests += 1
                    n = stub.requests
                if stub.delay:
                    import time

                    time.sleep(stub.delay)
                if n <= stub.fail_first:
                    wait = {} if stub.retry_after is None else {"retry-after": str(stub.retry_after)}
                    return self._send(stub.status, {"error": {"message": "scripted failure"}}, wait)
                prompt = body["messages"][-1]["content"]
                text = stub.reply(prompt)
                self._send(200, {"id": f"c{n}", "object": "chat.completion", "model": body["model"], "created": 0,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                                           "total_tokens": len(prompt.split()) + len(text.split())}})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # socketserver's default backlog of 5 resets bursts of parallel clients

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
