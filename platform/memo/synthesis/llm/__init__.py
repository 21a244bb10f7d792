"""The LLM generator: prompts, the step worker, one module per step, the resumable runner, the pipeline."""
