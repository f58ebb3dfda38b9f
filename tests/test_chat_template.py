"""pagoda's bounded chat-template renderer renders what transformers' apply_chat_template
renders, and stops templates that run past their budget."""
from __future__ import annotations

import threading
import time

import pytest

from pagoda.inputs.chat_template import Budget, TemplateBudgetError, render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "tabs\tand\nnewlines, ünïcödé, <|im_end|> inside"}],
]

# exercises what chat templates use: namespace, loop controls, tojson, tools, the generation
# tag, raise_exception, special-token variables and reasoning fields
RICH_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}{% if tools %}TOOLS: {{ tools | tojson }}
{% endif %}
{%- for m in messages -%}
{%- if m.role == 'tool' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
[{{ ns.n }}:{{ m.role }}]{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
{%- if m.reasoning_content %}(thought: {{ m.reasoning_content }}){% endif %}
{%- else %}{{ m.content }}{% endif %}
{% if loop.last and m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}[assistant]{% endif %}{{ eos_token if not add_generation_prompt }}"""


@pytest.fixture(scope="module")
def tokenizer(smollm_side_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_side_dir)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_equals_transformers(tokenizer, conv, add_generation_prompt):
    ours = render_chat(tokenizer, conv, add_generation_prompt=add_generation_prompt)
    ref = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref


def test_continue_final_message_equals_transformers(tokenizer):
    conv = CONVERSATIONS[1][:3]
    ours = render_chat(tokenizer, conv, add_generation_prompt=False, continue_final_message=True)
    ref = tokenizer.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert ours == ref and ours.endswith("4")


def test_rich_template_equals_transformers(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    conv = [{"role": "user", "content": "Weather in Hà Nội?"},
            {"role": "assistant", "content": "Let me check.", "reasoning": "need the tool"},
            {"role": "tool", "content": "sunny"}, {"role": "user", "content": "thanks"}]
    for kw in (dict(add_generation_prompt=True), dict(add_generation_prompt=False)):
        ours = render_chat(tokenizer, conv, RICH_TEMPLATE, tools=tools, **kw)
        ref = tokenizer.apply_chat_template(conv, chat_template=RICH_TEMPLATE, tools=tools,
                                            tokenize=False, **kw)
        assert ours == ref
        assert "(thought: need the tool)" in ours and "Hà Nội" in ours


def test_text_parts_are_joined(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(tokenizer, parts) == render_chat(tokenizer, [{"role": "user", "content": "a\nb"}])
    with pytest.raises(ValueError, match="image_url"):
        render_chat(tokenizer, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_raise_exception_and_bad_syntax_are_value_errors(tokenizer):
    with pytest.raises(ValueError, match="bad role"):
        render_chat(tokenizer, [{"role": "bad", "content": "x"}], RICH_TEMPLATE)
    with pytest.raises(ValueError, match="not a valid Jinja"):
        render_chat(tokenizer, CONVERSATIONS[0], "{% if %}")


def test_sandbox_keeps_internals_out_of_reach(tokenizer):
    assert render_chat(tokenizer, CONVERSATIONS[0], "{{ messages.__class__ }}") == ""
    with pytest.raises(ValueError, match="unsafe"):
        render_chat(tokenizer, CONVERSATIONS[0], "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        render_chat(tokenizer, CONVERSATIONS[0], "{% set ns = namespace(_x=1) %}")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(x=0) %}{% for i in range(3000) %}{% for j in range(3000) %}"
    "{% set ns.x = ns.x + 1 %}{% endfor %}{% endfor %}",
])
def test_slow_templates_stop_at_the_deadline(tokenizer, template):
    t0 = time.monotonic()
    with pytest.raises(TemplateBudgetError, match="longer than 0.3 s"):
        render_chat(tokenizer, CONVERSATIONS[0], template, budget=Budget(0.3))
    assert time.monotonic() - t0 < 1.5


def test_cancel_from_another_thread(tokenizer):
    budget = Budget(60)
    threading.Timer(0.2, budget.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(TemplateBudgetError, match="cancelled"):
        render_chat(tokenizer, CONVERSATIONS[0], "{% for i in range(100000) %}{% for j in range(100000) %}"
                    "{% endfor %}{% endfor %}", budget=budget)
    assert time.monotonic() - t0 < 1.5


@pytest.mark.parametrize("template,needle", [
    ('{{ "x" * 10000000 }}', "`*`"),
    ("{{ [0] * 10000000 }}", "`*`"),
    ("{{ 3 ** 10000000 }}", "`**`"),
    ("{{ range(1000000) | list }}", "range()"),
])
def test_size_budgets(tokenizer, template, needle):
    with pytest.raises(TemplateBudgetError, match=needle.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        render_chat(tokenizer, CONVERSATIONS[0], template)
