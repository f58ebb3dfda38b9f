"""--reasoning-parser: Qwen3 / DeepSeek-R1 thinking split into reasoning_content, on constructed
outputs, whole and streamed (cut at every character, the deltas must add up to the whole), and
together with tool calls."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.reasoning_parsers import ReasoningParser, get_reasoning_parser
from pagoda.entrypoints.openai.serving_chat import ChatPlan, ServingChat
from pagoda.entrypoints.openai.tool_parsers import HermesToolParser
from pagoda.outputs import CompletionOutput, RequestOutput

QWEN3_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
NO_THINKING_PROMPT = QWEN3_PROMPT + "<think>\n\n</think>\n\n"   # enable_thinking: false
OPENED_PROMPT = QWEN3_PROMPT + "<think>\n"                       # templates that open <think>

# (parser, prompt, output, reasoning, content)
CASES = [
    ("qwen3", QWEN3_PROMPT, "<think>\nTwo plus two is four.\n</think>\n\nThe answer is 4.",
     "\nTwo plus two is four.\n", "The answer is 4."),
    ("qwen3", QWEN3_PROMPT, "The answer is 4.", None, "The answer is 4."),
    ("qwen3", NO_THINKING_PROMPT, "The answer is 4.", None, "The answer is 4."),
    ("qwen3", QWEN3_PROMPT, "<think>\nStill thinking when max_tokens hit", "\nStill thinking when max_tokens hit", ""),
    ("qwen3", QWEN3_PROMPT, "<think></think>Direct.", "", "Direct."),
    ("qwen3", OPENED_PROMPT, "Hmm, 4.\n</think>\n\n4", "Hmm, 4.\n", "4"),
    ("qwen3", QWEN3_PROMPT, "Use <think> tags like this.", None, "Use <think> tags like this."),
    ("deepseek_r1", "<｜User｜>2+2?<｜Assistant｜><think>\n", "Adding.\n</think>\n\n4", "Adding.\n", "4"),
    ("deepseek_r1", "", "<think>Adding.</think>4", "Adding.", "4"),
    ("deepseek_r1", "", "cut off while thinking", "cut off while thinking", ""),
]


@pytest.mark.parametrize("name, prompt, text, reasoning, content", CASES)
def test_split(name, prompt, text, reasoning, content):
    got = ReasoningParser(name, prompt).split(text)
    assert (got.reasoning, got.content) == (reasoning, content)
    # every prefix's settled split is a prefix of the whole split (streaming never takes back)
    for k in range(len(text) + 1):
        part = ReasoningParser(name, prompt).split(text[:k], final=False)
        assert (reasoning or "").startswith(part.reasoning or "")
        assert content.startswith(part.content)


def test_unknown_parser_names_the_flag():
    with pytest.raises(ValueError, match="--reasoning-parser"):
        get_reasoning_parser("o1")


def _outputs(text: str):
    for k in range(1, len(text) + 1):
        last = k == len(text)
        yield RequestOutput("r", None, [1], [CompletionOutput(0, text[:k], list(range(k)),
                                                            finish_reason="stop" if last else None)],
                            finished=last, delta_text={0: text[k - 1]}, delta_token_ids={0: [k]})


async def _agen(items):
    for x in items:
        yield x


def _run(plan: ChatPlan, parser, text: str):
    chat = ServingChat(SimpleNamespace(model_name="m", tool_parser=parser))
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                tools=plan.tools)
    whole = chat._response(req, plan, "id", list(_outputs(text))[-1]).choices[0]

    async def collect():
        return [e async for e in chat._stream(req, plan, "id", _agen(_outputs(text)))]
    chunks = [json.loads(e[len("data: "):]) for e in asyncio.run(collect())[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return whole, deltas


@pytest.mark.parametrize("name, prompt, text, reasoning, content", CASES)
def test_streamed_reasoning_adds_up_to_the_message(name, prompt, text, reasoning, content):
    plan = ChatPlan([1], None, reasoning_parser=name, prompt_tail=prompt[-40:])
    whole, deltas = _run(plan, None, text)
    assert whole.message.reasoning_content == reasoning
    assert (whole.message.content or "") == content
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (reasoning or "")
    assert "".join(d.get("content") or "" for d in deltas) == content
    # a reasoning delta never carries content, and all reasoning comes before the content
    kinds = [("r" if d.get("reasoning_content") else "c") for d in deltas
             if d.get("reasoning_content") or d.get("content")]
    assert kinds == sorted(kinds, key=lambda k: k == "c")


def test_reasoning_then_a_tool_call():
    text = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    plan = ChatPlan([1], None, tools, HermesToolParser(), reasoning_parser="qwen3", prompt_tail=QWEN3_PROMPT)
    whole, deltas = _run(plan, HermesToolParser(), text)
    assert whole.message.reasoning_content == "\nThe user wants the weather.\n"
    assert whole.message.content is None and whole.finish_reason == "tool_calls"
    assert json.loads(whole.message.tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == whole.message.reasoning_content
