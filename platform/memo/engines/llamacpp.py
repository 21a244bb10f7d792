"""llama.cpp on CPU: one `llama-server` process per model (built for this CPU by
cluster/install_llamacpp.sh), on 127.0.0.1, with continuous batching over `parallel` slots.

Why a server process rather than an in-process binding: llama-server batches concurrent requests into
one decode step (measured ~1.4x aggregate per process at 16 clients), and more throughput comes from
more processes (replicas), not more threads. With Ray or torch on the same cores, each process gets ONE
thread: at two, spinning threads collapsed a 1.5B model's decode from 17 to 0.5 tok/s.

`complete` sends token ids (`/completion` takes a prompt as a list of tokens) and decodes the returned
tokens with the caller's HF tokenizer, so a memory answers from exactly the tokens it was trained on.
`chat` uses `/v1/chat/completions`, i.e. the chat template stored in the GGUF (executive, generator, judge).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from memo.engines.base import Reply
from memo.errors import MemoError

log = logging.getLogger(__name__)


def server_binary() -> str:
    """$MEMO_LLAMA_SERVER, else llama-server beside this Python (make install builds it), else on PATH."""
    for candidate in (os.environ.get("MEMO_LLAMA_SERVER"), str(Path(sys.prefix) / "bin" / "llama-server"),
                      shutil.which("llama-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise MemoError("engine llamacpp: llama-server is not installed; run `make install` "
                    "(cluster/install_llamacpp.sh builds it for this CPU) or set MEMO_LLAMA_SERVER")


def available() -> bool:
    try:
        server_binary()
        return True
    except MemoError:
        return False


def _timings(out: dict) -> dict:
    """llama-server's per-request `timings` as Reply fields (absent: zeros)."""
    t = out.get("timings") or {}
    return {"prefill_tokens": int(t.get("prompt_n") or 0), "prefill_s": float(t.get("prompt_ms") or 0) / 1000,
            "decode_s": float(t.get("predicted_ms") or 0) / 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server child process serving one GGUF on loopback; stopped with `close()` or at exit."""

    def __init__(self, gguf: str | Path, threads: int = 1, parallel: int = 4, ctx_per_slot: int = 4096,
                 start_timeout: float = 180.0):
        self.gguf, self.parallel = Path(gguf), parallel
        if not self.gguf.is_file():
            raise MemoError(f"{self.gguf}: no such GGUF file")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = [server_binary(), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx_per_slot * parallel),
               "--no-webui"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.close)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise MemoError(f"llama-server exited with code {self.proc.returncode} loading {self.gguf.name}: "
                                f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.close()
                raise MemoError(f"llama-server did not become ready in {start_timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.2)
        log.debug("llama-server %s on %s (%d thread(s), %d slots)", self.gguf.name, self.url, threads, parallel)

    def log_tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(Path(self._log.name).read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self._log.name)
        except (OSError, AttributeError):
            pass

    def __del__(self):
        self.close()


class LlamaCppEngine:
    """Requests to one llama-server, up to `parallel` in flight (its slots batch them together)."""

    def __init__(self, gguf: str | Path, tokenizer=None, threads: int = 1, parallel: int = 4,
                 ctx_per_slot: int = 4096, timeout: float = 600.0):
        self.server = LlamaServer(gguf, threads, parallel, ctx_per_slot)
        self.tok, self.timeout = tokenizer, timeout
        self.http = httpx.Client(base_url=self.server.url, timeout=timeout)
        self.pool = ThreadPoolExecutor(max_workers=parallel)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()
        self.server.close()

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            raise MemoError(f"llama-server HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def _complete_one(self, ids: list[int], max_tokens: int, temperature: float) -> Reply:
        try:
            out = self._post("/completion", {"prompt": ids, "n_predict": max_tokens, "temperature": temperature,
                                             "top_k": 0 if temperature == 0 else 40, "cache_prompt": True,
                                             "return_tokens": True, "repeat_penalty": 1.0})
        except (httpx.HTTPError, MemoError) as e:
            return Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
        tokens = out.get("tokens") or []
        finish = "length" if out.get("stop_type") == "limit" or out.get("stopped_limit") else "stop"
        if self.tok is None:
            return Reply((out.get("content") or "").strip(), "", len(ids), int(out.get("tokens_predicted") or 0),
                         finish, **_timings(out))
        # Decoded by the memory's own tokenizer, as transformers decodes; the end-of-turn token is not counted.
        special = set(self.tok.all_special_ids)
        return Reply(self.tok.decode(tokens, skip_special_tokens=True).strip(), "", len(ids),
                     sum(t not in special for t in tokens), finish, **_timings(out))

    def complete(self, batch: list[list[int]], max_tokens: int, temperature: float) -> list[Reply]:
        return list(self.pool.map(lambda ids: self._complete_one(list(ids), max_tokens, temperature), batch))

    def _chat_one(self, messages: list[dict], max_tokens: int, temperature: float, json_mode: bool) -> Reply:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if json_mode:  # a grammar: the reply is a JSON object (a small model otherwise drifts into prose)
            body["response_format"] = {"type": "json_object"}
        try:
            out = self._post("/v1/chat/completions", body)
        except (httpx.HTTPError, MemoError) as e:
            return Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
        choice, usage = out["choices"][0], out.get("usage") or {}
        return Reply((choice["message"].get("content") or "").strip(), "", usage.get("prompt_tokens", 0),
                     usage.get("completion_tokens", 0), "length" if choice.get("finish_reason") == "length" else "stop",
                     **_timings(out))

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float,
             json_mode: bool = False) -> list[Reply]:
        return list(self.pool.map(lambda m: self._chat_one(m, max_tokens, temperature, json_mode), batch))
