"""Prompts for the benchmarks: random token ids (the W1 definition), built-in chat prompts,
random text, or a JSONL file. Everything is seeded so runs compare like with like."""
from __future__ import annotations

import json
import os
import random

# Varied on purpose (length, topic, register) so a batch is not eight copies of one shape.
SYNTHETIC_CHAT: list[str] = [
    "Explain how a hash map handles collisions, with a short example in Python.",
    "Write a haiku about the first snow of winter in a small mountain village.",
    "What are the main differences between TCP and UDP? Answer in a few bullet points.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "Give me a three-day itinerary for a first visit to Kyoto, with food suggestions.",
    "Why is the sky blue? Explain it the way a physics teacher would to a curious student.",
    "Draft a polite email asking my landlord to fix a leaking kitchen tap this week.",
    "List five healthy breakfast ideas that take less than ten minutes to prepare.",
    "How does compound interest work? Show the formula and one worked example.",
    "Translate 'Where is the nearest train station?' into French, Spanish and German.",
    "Describe the water cycle in four steps.",
    "Write a short story opening about a lighthouse keeper who finds a message in a bottle.",
    "What is the difference between a process and a thread in an operating system?",
    "Suggest names for a bakery that specializes in sourdough bread.",
    "Explain recursion using the example of computing a factorial.",
    "What should I pack for a week-long hiking trip in autumn?",
    "Compare electric cars and petrol cars in terms of running costs and maintenance.",
    "Write a limerick about a cat who learned to code.",
    "How do vaccines train the immune system? Keep it under 150 words.",
    "Give tips for staying focused while working from home.",
    "What were the main causes of the French Revolution?",
    "Explain what a neural network is to someone who has never programmed.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Plan a birthday party for a seven-year-old who loves dinosaurs.",
]

_WORDS = ("the of and to in is that for it as with was on be by at this from or have an they "
          "which one you were all we can her has there been if more when will would who so no "
          "time river light market engine garden window music signal paper winter stone cloud "
          "number system table story letter mountain village travel simple quickly bright").split()


def random_token_prompts(n: int, lo: int, hi: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """W1: for each request a length uniform in [lo, hi], then ids uniform in [100, vocab-100)."""
    if vocab_size <= 200:
        raise ValueError(f"random prompts need a vocabulary of more than 200 tokens, got {vocab_size}")
    if not 1 <= lo <= hi:
        raise ValueError(f"--input-len-range: need 1 <= LO <= HI, got {lo} {hi}")
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def synthetic_chat_prompts(n: int) -> list[str]:
    """The first n built-in chat prompts, cycled if n exceeds the list."""
    return [SYNTHETIC_CHAT[i % len(SYNTHETIC_CHAT)] for i in range(n)]


def random_text_prompts(n: int, num_words: int, seed: int = 0) -> list[str]:
    """Random word salad of a given length, for servers when no dataset is given."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(num_words)) for _ in range(n)]


def load_jsonl_prompts(path: str, n: int | None = None) -> list[str]:
    """One {"prompt": "..."} object per line; blank lines are skipped. Cycled up to n."""
    if not os.path.isfile(path):
        raise ValueError(f"--dataset: no such file: {path}")
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--dataset: {path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f"--dataset: {path}:{lineno}: expected an object with a non-empty "
                                 "string field \"prompt\"")
            prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"--dataset: {path} holds no prompts")
    if n is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(n)]


def chat_token_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn chat rendered with the model's template, ready for generation."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
