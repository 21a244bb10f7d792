"""MeMo: Memory as a Model, on Ray.

A GENERATOR synthesizes question/answer reflections from a domain's documents, a small MEMORY model is
fine-tuned on them, served per domain, versioned in MLflow, and questioned by a frozen EXECUTIVE LLM.
"""

__version__ = "0.1.0"
