"""A memory model behind any engine, asked in exactly its training format.

The memory's own HF tokenizer renders `memory_messages(question)` with its chat template and the token
ids go to the backend unchanged (transformers or llama.cpp), so the prompt a memory is asked with is
token for token the one it was trained on, whichever engine serves it. Replies get the same
degenerate-repetition trim on every backend.
"""

from __future__ import annotations

import logging
from pathlib import Path

from memo.engines.base import Reply
from memo.errors import MemoError
from memo.inference import memory_messages, prompt_ids, trim_repetition

log = logging.getLogger(__name__)
BACKENDS = ("auto", "transformers", "llamacpp")


def resolve_backend(backend: str) -> str:
    """auto: llama.cpp when llama-server is installed (the fast CPU engine), else transformers."""
    if backend not in BACKENDS:
        raise MemoError(f"engine={backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from memo.engines.llamacpp import available

    return "llamacpp" if available() else "transformers"


def memory_gguf(model_dir: str | Path) -> Path:
    """MODEL_DIR/model.gguf: written at registration, or converted now, once, for a folder without one (an
    older version; a LoRA adapter export is merged onto its base first)."""
    from memo import gguf
    from memo.models import materialize_full_model

    path = Path(model_dir) / "model.gguf"
    # A conversion that failed (e.g. a tokenizer the converter does not know) fails the same way every
    # time: its reason is kept beside the model so the next caller (the post-training check right after
    # registration, each serving replica) does not spend ~8 s finding out again. Delete it to retry.
    failed = Path(model_dir) / "model.gguf.failed"
    if not path.is_file():
        if failed.is_file():
            raise MemoError(failed.read_text().strip())
        full = materialize_full_model(Path(model_dir))
        log.info(f"[engine] converting {full} to GGUF (once, f16)")
        try:
            gguf.convert(full, path)
        except MemoError as e:
            try:
                failed.write_text(str(e) + "\n")
            except OSError:  # a read-only model folder: nothing is remembered, nothing breaks
                pass
            raise
    return path


class MemoryEngine:
    def __init__(self, model_dir: str | Path, backend: str = "auto", threads: int = 1, parallel: int = 4,
                 loaded=None):
        from transformers import AutoTokenizer

        from memo.models import read_manifest

        self.backend = resolve_backend(backend)
        # The version's calibrated abstention threshold, when training calibrated one (None otherwise).
        self.abstain_threshold = (read_manifest(model_dir).get("metrics") or {}).get("abstain_threshold")
        if self.backend == "llamacpp" and backend == "auto":
            try:
                memory_gguf(model_dir)
            except MemoError as e:  # e.g. a tokenizer llama.cpp's converter does not know: still servable
                log.warning(f"[engine] {model_dir}: no GGUF ({e}); using transformers")
                self.backend = "transformers"
        if self.backend == "llamacpp":
            from memo.engines.llamacpp import LlamaCppEngine
            from memo.models import materialize_full_model

            self.tok = AutoTokenizer.from_pretrained(str(materialize_full_model(Path(model_dir))),
                                                     local_files_only=True)
            self.engine = LlamaCppEngine(memory_gguf(model_dir), self.tok, threads=threads, parallel=parallel)
        else:
            from memo.engines.hf import HfEngine

            self.engine = HfEngine(str(model_dir), 0, loaded=loaded)  # torch keeps the process's threads
            self.tok = self.engine.tok

    @property
    def batches_itself(self) -> bool:
        """llama-server batches in-flight requests continuously over its slots: callers should send each
        question as it comes rather than gather a batch and wait for its slowest member."""
        return self.backend == "llamacpp"

    def ask(self, questions: list[str], max_tokens: int = 64, temperature: float = 0.0) -> list[Reply]:
        """One fresh single-turn chat per question, in the training format."""
        ids = [prompt_ids(self.tok, memory_messages(q)) for q in questions]
        replies = self.engine.complete(ids, max_tokens, temperature)
        for r in replies:
            r.text = trim_repetition(r.text)
        return replies

    def heal(self) -> None:
        """Restart a dead engine process (llama.cpp) in the background; a MemoError once it has given up."""
        if hasattr(self.engine, "heal"):
            self.engine.heal()
            if self.engine.failure:
                raise MemoError(self.engine.failure)

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()

    def __del__(self):  # the Serve multiplexed LRU drops a version: its llama-server process stops too
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
