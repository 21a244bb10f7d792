"""vLLM, the GPU engine. Optional: vLLM is not importable on CPU machines, so it is imported on first use,
with an error that says how to get it. A memory is asked with exactly its training tokens, as on every
engine: its own tokenizer renders the prompt and vLLM generates from the ids."""

from __future__ import annotations

from memo.engines.base import Reply
from memo.errors import MemoError
from memo.inference import memory_messages, prompt_ids, trim_repetition


class VLLMMemory:
    """A memory version on vLLM (GPU replicas); greedy, one fresh chat per question."""

    def __init__(self, path: str, models_per_replica: int = 1):
        try:
            from vllm import LLM
        except ImportError as e:
            raise MemoError(f"engine=vllm needs vLLM on the replica ({e}); install memo-platform[gpu] on GPU "
                            "nodes, or use engine=llamacpp or transformers") from None
        # The multiplexed LRU may hold several versions on one GPU: each gets its share of memory.
        self.llm = LLM(model=path, dtype="bfloat16", gpu_memory_utilization=0.85 / max(1, models_per_replica),
                       enforce_eager=False)
        self.tok = self.llm.get_tokenizer()

    def __del__(self):
        # The multiplexed LRU drops this engine: free its GPU memory before the next version loads.
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        except Exception:
            pass

    def ask(self, questions: list[str], max_tokens: int = 64, temperature: float = 0.0) -> list[Reply]:
        from vllm import SamplingParams, TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=prompt_ids(self.tok, memory_messages(q))) for q in questions]
        outs = self.llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens), use_tqdm=False)
        return [Reply(trim_repetition(o.outputs[0].text.strip()), "", len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                      "length" if o.outputs[0].finish_reason == "length" else "stop") for o in outs]
