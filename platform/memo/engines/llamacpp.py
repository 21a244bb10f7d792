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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from memo.engines.base import Reply, confidence
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


def exit_reason(code: int) -> str:
    """A child's return code as a person reads it: `code 1`, or `signal SIGSEGV` for a crash."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class LlamaServer:
    """A llama-server child process serving one GGUF on loopback; stopped with `close()` or at exit.

    A process that exits while loading (a crash, a bad GGUF, out of memory) is a MemoError naming its exit
    code and the last lines of its log, raised once; `restart()` starts a fresh process on a new port."""

    def __init__(self, gguf: str | Path, threads: int = 1, parallel: int = 4, ctx_per_slot: int = 4096,
                 start_timeout: float = 180.0, binary: str | None = None, extra_args: tuple[str, ...] = ()):
        self.gguf, self.parallel = Path(gguf), parallel
        if not self.gguf.is_file():
            raise MemoError(f"{self.gguf}: no such GGUF file")
        self.threads, self.ctx_per_slot, self.start_timeout = threads, ctx_per_slot, start_timeout
        self.binary, self.extra_args = binary or server_binary(), list(extra_args)
        self.proc = None
        atexit.register(self.close)
        self._start()

    def _start(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = [self.binary, "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel),
               "-c", str(self.ctx_per_slot * self.parallel), "--no-webui", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise MemoError(f"llama-server exited with {exit_reason(self.proc.returncode)} loading "
                                f"{self.gguf.name}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                tail = self.log_tail()
                self.close()
                raise MemoError(f"llama-server did not become ready in {self.start_timeout:.0f} s loading "
                                f"{self.gguf.name}: {tail}")
            time.sleep(0.2)
        log.debug("llama-server %s on %s (%d thread(s), %d slots)", self.gguf.name, self.url, self.threads,
                  self.parallel)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Stop whatever is left of the process and start a fresh one (a MemoError if it cannot load)."""
        self.close()
        self._start()

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
                self.proc.wait(timeout=10)
        try:
            os.unlink(self._log.name)
        except (OSError, AttributeError):
            pass

    def __del__(self):
        self.close()


# How a dead llama-server is brought back. A process that dies is restarted at once, in the background;
# requests meanwhile fail fast with `retry_after` set (the router answers 503 + Retry-After). A process
# that keeps dying (MAX_RESTARTS within RESTART_WINDOW_S) is given up: `failure` says why, and a Serve
# replica's health check then fails so that Serve replaces the whole replica.
RETRY_AFTER_S = 5
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0


class LlamaCppEngine:
    """Requests to one llama-server, up to `parallel` in flight (its slots batch them together)."""

    def __init__(self, gguf: str | Path, tokenizer=None, threads: int = 1, parallel: int = 4,
                 ctx_per_slot: int = 4096, timeout: float = 600.0, seed: int | None = None):
        self.server = LlamaServer(gguf, threads, parallel, ctx_per_slot)
        # seed: sampled replies (temperature > 0) drawn from a fixed stream per request, so a rerun on the
        # same build and CPU writes the same text; None leaves llama-server's random seed.
        self.tok, self.timeout, self.seed = tokenizer, timeout, seed
        # No base_url: a restarted server listens on a new port, so every request names self.server.url.
        self.http = httpx.Client(timeout=timeout)
        self.pool = ThreadPoolExecutor(max_workers=parallel)
        self._lock = threading.Lock()
        self._restarting = False
        self._generation = 0  # restarts begun so far: a request sent before one began met the gap
        self._restarts: list[float] = []
        self.failure = ""  # set once the engine has given up restarting

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()
        self.server.close()

    def heal(self) -> bool:
        """True when the server is up. A dead one is restarted in a background thread (one restart at a
        time); what callers see meanwhile is False, then True once the new process answers /health."""
        if self.server.alive and not self._restarting:
            return True
        with self._lock:
            if self._restarting or self.failure:
                return False
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
            if len(self._restarts) >= MAX_RESTARTS:
                self.failure = (f"llama-server for {self.server.gguf.name} died {MAX_RESTARTS} times in "
                                f"{RESTART_WINDOW_S:.0f} s; last: {self.server.log_tail()}")
                log.error("memo engine: %s", self.failure)
                return False
            self._restarts.append(now)
            self._restarting = True
            self._generation += 1
        code = self.server.proc.returncode if self.server.proc else None
        log.warning("memo engine: llama-server for %s exited with %s; restarting", self.server.gguf.name,
                    exit_reason(code) if code is not None else "no code")
        threading.Thread(target=self._restart, name="llama-server-restart", daemon=True).start()
        return False

    def _restart(self) -> None:
        try:
            self.server.restart()
            log.warning("memo engine: llama-server for %s is back on %s", self.server.gguf.name, self.server.url)
        except MemoError as e:
            log.error("memo engine: restart failed: %s", e)  # the next request or health check tries again
        finally:
            self._restarting = False

    def _failed(self, e: Exception, sent_to, generation: int = -1) -> Reply:
        """A request that failed: an ordinary engine error, or (the process it was sent to is gone, or a
        restart began or was under way since it was sent) a retryable one. `sent_to` and `generation` are
        that process and the restart count when it was sent: the server may be back by the time the failure
        is handled (CI saw such requests answered 503 without Retry-After), which is the gap all the same."""
        if isinstance(e, httpx.TransportError) and sent_to is not None:
            # A dying process closes its sockets a moment before it can be reaped: give it that moment.
            try:
                sent_to.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if (generation == self._generation and sent_to is self.server.proc and self.server.alive
                and not self._restarting):
            return Reply(error=f"engine_error: {type(e).__name__}: {str(e)[:160]}")
        self.heal()
        if self.failure:  # given up: the replica fails its next health check and Serve replaces it
            return Reply(error=f"engine_failed: {self.failure}", retry_after=2 * RETRY_AFTER_S)
        return Reply(error=f"engine_restarting: llama-server for {self.server.gguf.name} stopped; it is being "
                           f"restarted", retry_after=RETRY_AFTER_S)

    def _post(self, path: str, body: dict) -> dict | Reply:
        """llama-server's JSON reply, or the failed Reply when the request did not get one."""
        # -1 for a request sent while a restart was under way (it may reach the new process too early)
        generation = -1 if self._restarting else self._generation
        sent_to, url = self.server.proc, self.server.url
        if self.seed is not None:  # both generation endpoints take it
            body = {**body, "seed": self.seed}
        try:
            r = self.http.post(url + path, json=body)
            if r.status_code != 200:
                raise MemoError(f"llama-server HTTP {r.status_code}: {r.text[:200]}")
            return r.json()
        except (httpx.HTTPError, MemoError) as e:
            return self._failed(e, sent_to, generation)

    def _complete_one(self, ids: list[int], max_tokens: int, temperature: float) -> Reply:
        # n_probs 1: each generated token's log-probability comes back (the reply's confidence)
        out = self._post("/completion", {"prompt": ids, "n_predict": max_tokens, "temperature": temperature,
                                         "top_k": 0 if temperature == 0 else 40, "cache_prompt": True,
                                         "return_tokens": True, "repeat_penalty": 1.0, "n_probs": 1})
        if isinstance(out, Reply):
            return out
        sure = confidence([p["logprob"] for p in out.get("completion_probabilities") or [] if "logprob" in p])
        tokens = out.get("tokens") or []
        finish = "length" if out.get("stop_type") == "limit" or out.get("stopped_limit") else "stop"
        if self.tok is None:
            return Reply((out.get("content") or "").strip(), "", len(ids), int(out.get("tokens_predicted") or 0),
                         finish, confidence=sure, **_timings(out))
        # Decoded by the memory's own tokenizer, as transformers decodes; the end-of-turn token is not counted.
        special = set(self.tok.all_special_ids)
        return Reply(self.tok.decode(tokens, skip_special_tokens=True).strip(), "", len(ids),
                     sum(t not in special for t in tokens), finish, confidence=sure, **_timings(out))

    def complete(self, batch: list[list[int]], max_tokens: int, temperature: float) -> list[Reply]:
        return list(self.pool.map(lambda ids: self._complete_one(list(ids), max_tokens, temperature), batch))

    def _chat_one(self, messages: list[dict], max_tokens: int, temperature: float, json_mode: bool) -> Reply:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if json_mode:  # a grammar: the reply is a JSON object (a small model otherwise drifts into prose)
            body["response_format"] = {"type": "json_object"}
        out = self._post("/v1/chat/completions", body)
        if isinstance(out, Reply):
            return out
        choice, usage = out["choices"][0], out.get("usage") or {}
        return Reply((choice["message"].get("content") or "").strip(), "", usage.get("prompt_tokens", 0),
                     usage.get("completion_tokens", 0), "length" if choice.get("finish_reason") == "length" else "stop",
                     **_timings(out))

    def chat(self, batch: list[list[dict]], max_tokens: int, temperature: float,
             json_mode: bool = False) -> list[Reply]:
        return list(self.pool.map(lambda m: self._chat_one(m, max_tokens, temperature, json_mode), batch))


def cpu_features(server_log: str) -> list[str]:
    """The CPU features a llama-server build uses, from the `system_info` line it logs at start
    (`CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | ...`)."""
    line = next((ln for ln in server_log.splitlines() if "system_info" in ln), "")
    features = []
    for part in line.split("|"):
        name, _, on = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if on.strip() == "1" and name.replace("_", "").isalnum() and name.isupper():
            features.append(name)
    return features


def smoke_test(binary: str, gguf: str | Path | None = None) -> str:
    """Prove a llama-server build runs on this machine: load a small GGUF (the SmolLM2-135M Q4_1 that
    make install brings: its matrix products take the same quantized kernels as the Qwen models, AMX ones
    included), answer one chat question greedily and check the answer. Returns a line naming the CPU
    features the build uses; a MemoError with the exit code and log tail when the server crashes or
    answers nonsense. cluster/install_llamacpp.sh runs it before it installs a binary."""
    from memo.models import builtin_gguf

    path = Path(gguf) if gguf else builtin_gguf()
    t0 = time.time()
    # -lv 4: the log's trace level holds the build's system_info line (its CPU features)
    server = LlamaServer(path, threads=1, parallel=1, ctx_per_slot=512, start_timeout=120, binary=binary,
                         extra_args=("-lv", "4"))
    try:
        try:
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
                # with a system line: the 135M model answers plainly (without one it drifts into French)
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0})
        except httpx.HTTPError as e:
            try:  # a crash on the first matrix product: let the process finish dying to read its code
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            code = server.proc.poll()
            raise MemoError(f"llama-server {'exited with ' + exit_reason(code) if code is not None else 'failed'} "
                            f"on its first request ({type(e).__name__}): {server.log_tail()}") from None
        if r.status_code != 200:
            raise MemoError(f"llama-server answered HTTP {r.status_code}: {r.text[:160]}")
        answer = (r.json()["choices"][0]["message"].get("content") or "").strip()
        if "paris" not in answer.lower():
            raise MemoError(f"llama-server answered {answer!r} to 'What is the capital of France?' (expected "
                            "Paris): its kernels compute wrong results on this CPU")
        features = cpu_features(Path(server._log.name).read_text(errors="replace"))
    finally:
        server.close()
    return f"ok in {time.time() - t0:.1f} s ({answer[:40]!r}); CPU features: {' '.join(features) or 'unknown'}"


if __name__ == "__main__":
    # python -m memo.engines.llamacpp smoke BINARY [GGUF]: one line, exit 0 when the build works here
    import argparse

    parser = argparse.ArgumentParser(prog="python -m memo.engines.llamacpp")
    parser.add_argument("command", choices=["smoke"])
    parser.add_argument("binary")
    parser.add_argument("gguf", nargs="?")
    args = parser.parse_args()
    try:
        print(f"smoke test: {smoke_test(args.binary, args.gguf)}")
    except MemoError as e:
        print(f"smoke test failed: {e}")
        sys.exit(1)
