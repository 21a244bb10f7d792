"""Reflection synthesis: the stage (`synthesize`), the schema, and the generators (rules, LLM)."""

from memo.synthesis.schema import load_reflections
from memo.synthesis.stage import synthesize

__all__ = ["load_reflections", "synthesize"]
