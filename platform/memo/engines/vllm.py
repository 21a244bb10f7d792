"""vLLM, the GPU engine. Optional: vLLM is not importable on CPU machines, so it is imported on first use,
with an error that says how to get it. A memory is asked with exactly its training tokens, as on every
engine: its own tokenizer renders the prompt and vLLM generates from the ids."""

from __future__ import annotations

from memo.engines.base import Reply
from memo.errors import MemoError
from memo.inference import memory_messages, prompt_ids, trim_repetition


def vllm_engine_args(path: str, models_per_replica: int, replica_gpus: float, max_model_len: int,
                     gpu_memory_share: float) -> dict:
    """vLLM's `LLM(**this)` for one memory version on a replica: sized, never the whole GPU by default.

    A replica with N whole GPUs (replica_gpus=N) splits every version over them (tensor parallel); a
    fraction of a GPU (0.5: two replicas share one) scales the memory share down with it. The versions the
    multiplexed LRU holds at once (models_per_replica) divide the replica's share between them, and a short
    max_model_len (a memory is asked one question) keeps each engine's KV cache to what it needs."""
    if replica_gpus <= 0:
        raise MemoError("engine=vllm needs replica_gpus > 0 (vLLM runs on GPUs only)")
    if replica_gpus > 1 and replica_gpus != int(replica_gpus):
        raise MemoError(f"replica_gpus={replica_gpus:g}: a vLLM replica takes a fraction of one GPU or whole GPUs")
    per_gpu = gpu_memory_share * min(1.0, replica_gpus) / max(1, models_per_replica)
    return {"model": path, "dtype": "bfloat16", "max_model_len": max_model_len,
            "gpu_memory_utilization": round(per_gpu, 4), "tensor_parallel_size": max(1, int(replica_gpus)),
            "enforce_eager": False}


class VLLMMemory:
    """A memory version on vLLM (GPU replicas); greedy, one fresh chat per question."""

    def __init__(self, path: str, models_per_replica: int = 1, replica_gpus: float = 1.0, max_model_len: int = 2048,
                 gpu_memory_share: float = 0.85):
        try:
            from vllm import LLM
        except ImportError as e:
            raise MemoError(f"engine=vllm needs vLLM on the replica ({e}); install memo-platform[gpu] on GPU "
                            "nodes, or use engine=llamacpp or transformers") from None
        self.llm = LLM(**vllm_engine_args(path, models_per_replica, replica_gpus, max_model_len, gpu_memory_share))
        self.tok = self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine now (its worker processes and their GPU memory), before the next version loads:
        garbage collection alone leaves the engine core's processes holding the memory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            if hasattr(llm, "shutdown"):  # newer vLLM: the documented teardown
                llm.shutdown()
            else:  # vLLM's V1 engine: the engine core client owns the worker processes
                core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
        finally:
            del llm
            import gc

            gc.collect()
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - no CUDA here: nothing to free
                pass

    def __del__(self):
        # Serve's multiplexed LRU calls this when it drops the version
        self.close()

    def ask(self, questions: list[str], max_tokens: int = 64, temperature: float = 0.0) -> list[Reply]:
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=prompt_ids(self.tok, memory_messages(q))) for q in questions]
        outs = self.llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens), use_tqdm=False)
        return [Reply(trim_repetition(o.outputs[0].text.strip()), "", len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                      "length" if o.outputs[0].finish_reason == "length" else "stop") for o in outs]
