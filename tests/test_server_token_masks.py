"""vLLM's `bad_words` and `allowed_token_ids` on a real `pagoda serve` with the bundled model, through
the official openai SDK (extra_body) and raw HTTP: a word greedy decoding produces is avoided (a
one-token word never appears; a two-token word keeps its first token but never completes),
allowed_token_ids restricts every generated token, and bad values are 400s naming the field."""
from __future__ import annotations

import httpx
import openai
import pytest

from server_utils import PagodaServer

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    with PagodaServer(["--max-model-len", "1024", "--disable-log-requests"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


def complete(client, **extra):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True, **extra})
    return r.choices[0]


def test_bad_words_avoid_what_greedy_would_write(client):
    free = complete(client)
    assert free.text.startswith(" Paris") and "The answer" in free.text, free.text
    one = complete(client, bad_words=["Paris"])   # one token (" Paris" inside a text)
    assert "Paris" not in one.text and one.token_ids[0] != free.token_ids[0]
    two = complete(client, bad_words=["The answer"])   # "The" then " answer": only its end is banned
    assert free.text.split("The answer")[0] in two.text   # the same until the word
    assert "The answer" not in two.text
    # the other fields keep working beside them (a stop string, a seed)
    seeded = complete(client, bad_words=["Paris"], temperature=0.8, seed=3, stop=["\n"])
    assert "Paris" not in seeded.text and "\n" not in seeded.text


def test_allowed_token_ids_restrict_every_token(client):
    free = complete(client)
    allowed = sorted(set(free.token_ids[1:]) | {28, 30, 198, 216})  # not greedy's first token
    got = complete(client, allowed_token_ids=allowed)
    assert got.token_ids and set(got.token_ids) <= set(allowed)
    assert got.token_ids[0] != free.token_ids[0]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8,
        temperature=1.0, seed=0, extra_body={"allowed_token_ids": [33, 34, 35], "return_token_ids": True})
    assert chat.choices[0].token_ids and set(chat.choices[0].token_ids) <= {33, 34, 35}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body, param, message", [
    ({"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
    ({"allowed_token_ids": [1, 10 ** 7]}, "allowed_token_ids", "outside the vocabulary"),
    ({"allowed_token_ids": [1, -3]}, "allowed_token_ids.1", "greater than or equal to 0"),
    ({"bad_words": ["fine", " "]}, "bad_words", "non-empty"),
    ({"bad_words": ["w"] * 2000}, "bad_words", "at most"),
])
def test_bad_values_are_400s_naming_the_field(server, route, body, param, message):
    payload = ({"prompt": PROMPT} if route == "/v1/completions"
               else {"messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(server.url + route, timeout=60, json={"model": MODEL, "max_tokens": 4, **payload, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_the_sdk_sees_the_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, allowed_token_ids=[])
    assert e.value.body["param"] == "allowed_token_ids"
