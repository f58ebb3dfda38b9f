"""Chat messages -> prompt text through the model's chat template (transformers renders it)."""
from __future__ import annotations

from typing import Optional


def _flatten_content(content) -> str:
    """OpenAI allows content as a list of parts; text parts are joined, others refused."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "text":
            parts.append(p.get("text", ""))
        elif isinstance(p, str):
            parts.append(p)
        else:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise ValueError(f"messages: content part of type {kind!r} is not supported (text only)")
    return "\n".join(parts)


def render_chat(tokenizer, messages: list[dict], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                **chat_template_kwargs) -> str:
    if tokenizer is None:
        raise ValueError("messages: chat needs a tokenizer (started with --skip-tokenizer-init)")
    if not messages:
        raise ValueError("messages: must not be empty")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("messages: each message needs a 'role'")
        msgs.append({**m, "content": _flatten_content(m.get("content"))})
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message: cannot be combined with add_generation_prompt")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("messages: this model has no chat template; pass --chat-template")
    try:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **chat_template_kwargs)
    except ValueError:
        raise
    except Exception as e:  # jinja errors from a template are the caller's input problem
        raise ValueError(f"messages: chat template failed: {e}") from None
