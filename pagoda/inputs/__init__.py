"""Front-end input handling: prompts (vLLM's TextPrompt / TokensPrompt), tokenizing, validation."""
from pagoda.inputs.data import TextPrompt, TokensPrompt

__all__ = ["TextPrompt", "TokensPrompt"]
