"""Property test of every request field against a live `pagoda serve` (issue: hostile inputs).

Every integer, string, list and object field of every request model (found by walking the
pydantic models, nested messages and content parts included) gets hostile values: integers far
outside any range, booleans, floats, lone surrogates, NUL, huge strings, huge and deeply nested
lists, objects with hostile keys. First every field meets every value of a fixed catalogue, then
hypothesis mixes random values into one to three fields at once (derandomized, so CI sees the
same cases). No response may be a 5xx or a malformed error, and a victim chat running beside
them all the time must keep its exact greedy output.

The server runs with --max-model-len 64 and the bodies ask for one token, so that no accepted
request generates for long (the run takes a few minutes on a 2-core CPU). The pooling request
models (/pooling, /classify, /score, /rerank, /v1/embeddings) meet the same catalogue on a tiny
cross-encoder, beside a victim /score whose scores must not move.
"""
from __future__ import annotations

import copy
import json
import threading
import time
import typing

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pagoda.entrypoints.openai import protocol as P
from server_utils import PagodaServer
from tiny_pooling import build_encoder

pytestmark = pytest.mark.slow

KEY = "k1"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARGS = ["--api-key", KEY, "--max-model-len", "64", "--max-concurrent-requests", "16",
        "--disable-log-requests", "--disable-log-stats"]
HYPOTHESIS_EXAMPLES = 100
VICTIM = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
          "max_tokens": 8, "temperature": 0}

MESSAGE = {"role": "user", "content": "Hi"}
ENDPOINTS = {  # request model -> (path, a valid body to mutate)
    P.ChatCompletionRequest: ("/v1/chat/completions", {"messages": [MESSAGE], "max_tokens": 1}),
    P.CompletionRequest: ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    P.TokenizeCompletionRequest: ("/tokenize", {"prompt": "Hi"}),
    P.TokenizeChatRequest: ("/tokenize", {"messages": [MESSAGE]}),
    P.DetokenizeRequest: ("/detokenize", {"tokens": [1, 2]}),
    P.EmbeddingRequest: ("/v1/embeddings", {"input": "Hi"}),  # 400 here: a generative model
    P.ResponsesRequest: ("/v1/responses", {"input": "Hi", "max_output_tokens": 1}),
}
POOLING_ENDPOINTS = {  # on a cross-encoder (one label): all but /v1/embeddings serve
    P.PoolingRequest: ("/pooling", {"input": "Hi"}),
    P.ClassificationRequest: ("/classify", {"input": "Hi"}),
    P.ScoreRequest: ("/score", {"text_1": "Hi", "text_2": ["a", "b"]}),
    P.RerankRequest: ("/rerank", {"query": "Hi", "documents": ["a", "b"]}),
    P.EmbeddingRequest: ("/v1/embeddings", {"input": "Hi"}),
}
SCORE_VICTIM = {"text_1": "what keeps the kv cache small",
                "text_2": ["bananas are yellow", "paged attention stores the kv cache in blocks"]}
KEY_SLOT = "<key>"  # a path step into a free-form object (logit_bias, tools, kwargs)

HUGE_INT = [-(1 << 63) - 1, -1, 0, 1 << 31, 1 << 63, 1 << 64]
CATALOGUE = HUGE_INT + [
    True, False, None, 1.5, 1e308, -1e308,
    "", "\ud800", "a\ud83d", "\x00", "x" * 100_000,
    [], [True, False], ["\ud800"], [1 << 63], [1] * 50_000, ["a"] * 3000, [[1 << 64]],
    json.loads("[" * 400 + "]" * 400),
    {}, {"\ud800": 1}, {"a": "\ud800"}, {str(i): 1 for i in range(5000)},
]


# ------------------------------------------------------------------------ the fields to fuzz

def _walk(ann, path: tuple) -> list[tuple]:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _walk(args[0], path)
    if origin is typing.Union:
        found = [path]
        for a in args:
            found += [p for p in _walk(a, path) if p not in found]
        return found
    if origin is list:
        return [path] + _walk(args[0], path + (0,))
    if origin is dict:
        return [path, path + (KEY_SLOT,)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [path] + fields_of(ann, path)
    return [path]


def fields_of(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every field path of a request model, nested models and list items included."""
    paths = []
    for name, field in model.model_fields.items():
        paths += _walk(field.annotation, prefix + (name,))
    return paths


CASES = [(model, path) for model in ENDPOINTS for path in fields_of(model)]
POOLING_CASES = [(model, path) for model in POOLING_ENDPOINTS for path in fields_of(model)]


def _container(path: tuple, i: int):
    """A valid default for ``path[i]`` when the fuzz steps into it."""
    name, deeper = path[i], len(path) > i + 2
    if not isinstance(path[i + 1], int):
        return {}
    return {"messages": [dict(MESSAGE)], "content": [{"type": "text", "text": "Hi"}],
            "prompt": [[1]] if deeper else ["Hi"], "input": [[1]] if deeper else ["Hi"],
            "stop": ["Hi"], "stop_token_ids": [1], "tokens": [1], "text_1": ["Hi"],
            "text_2": ["Hi"], "documents": ["Hi"]}.get(name, [{}])


def put(body: dict, path: tuple, value) -> dict:
    """A copy of ``body`` with ``value`` at ``path``, building the containers on the way; at a
    KEY_SLOT a string value is the key too (hostile keys)."""
    body = copy.deepcopy(body)
    node = body
    for i, step in enumerate(path[:-1]):
        child = node[step] if (isinstance(node, dict) and step in node) or isinstance(node, list) else None
        want = list if isinstance(path[i + 1], int) else dict
        if not isinstance(child, want) or not child and want is list:
            child = node[step] = _container(path, i)
        node = child
    last = path[-1]
    if last == KEY_SLOT:
        last = value if isinstance(value, str) and len(value) < 100 else "1"
    node[last] = value
    return body


# ------------------------------------------------------------------------------- the checks

@pytest.fixture(scope="module")
def server():
    with PagodaServer(ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def pooling_server(tmp_path_factory):
    path = build_encoder("bert", str(tmp_path_factory.mktemp("fuzz-reranker")), num_labels=1, seed=1)
    with PagodaServer([path, *ARGS]) as s:
        yield s


class Victim(threading.Thread):
    """A normal client beside the fuzz: greedy chats (plain and streamed), outputs recorded."""

    def __init__(self, server, reference):
        super().__init__(daemon=True)
        self.server, self.reference = server, reference
        self.stop = threading.Event()
        self.runs, self.failures = 0, []

    def same(self, got) -> bool:
        return got == self.reference

    def one(self, client: httpx.Client, stream: bool) -> str:
        for _ in range(60):  # 429 (a fuzz request may hold every slot) says: retry
            if stream:
                with client.stream("POST", "/v1/chat/completions", json={**VICTIM, "stream": True}) as r:
                    if r.status_code == 429:
                        time.sleep(float(r.headers["retry-after"]) / 4)
                        continue
                    assert r.status_code == 200, r.read()
                    data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
                assert data[-1] == "[DONE]"
                events = [json.loads(d) for d in data[:-1]]
                assert not any("error" in e for e in events), events
                return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                               if e["choices"])
            r = client.post("/v1/chat/completions", json=VICTIM)
            if r.status_code == 429:
                time.sleep(float(r.headers["retry-after"]) / 4)
                continue
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        raise AssertionError("the victim was refused (429) for a minute")

    def run(self):
        with httpx.Client(base_url=self.server.url, headers=AUTH, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    got = self.one(client, stream=self.runs % 2 == 1)
                    if not self.same(got):
                        self.failures.append(f"output changed: {got!r}")
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.failures.append(repr(e))
                self.runs += 1


class ScoreVictim(Victim):
    """/score beside the pooling fuzz: the same scores (up to float rounding: the batch it
    lands in changes the order of additions, not the result)."""

    def one(self, client: httpx.Client, stream: bool) -> list[float]:
        for _ in range(60):
            r = client.post("/score", json=SCORE_VICTIM)
            if r.status_code == 429:
                time.sleep(float(r.headers["retry-after"]) / 4)
                continue
            assert r.status_code == 200, r.text
            return [d["score"] for d in r.json()["data"]]
        raise AssertionError("the victim was refused (429) for a minute")

    def same(self, got) -> bool:
        return len(got) == len(self.reference) and all(abs(a - b) < 1e-5
                                                       for a, b in zip(got, self.reference))


def check_response(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    assert r.headers.get("x-request-id"), what
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}, (what, err)
        assert isinstance(err["message"], str) and err["message"], (what, err)


def send(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes lone surrogates as \ud800 (valid JSON; not valid UTF-8 unescaped)
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def _reference(server) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", json=VICTIM, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _values_for(path: tuple) -> list:
    values = list(CATALOGUE)
    if path[-1] == KEY_SLOT:  # object keys: only strings can be keys
        values = [v for v in values if isinstance(v, str) and len(v) < 100] + [1e308, None, [1]]
    return values


def run_catalogue(server, cases, endpoints, victim: Victim) -> dict[int, int]:
    """Every case with every catalogue value, the victim running beside; the statuses seen."""
    victim.start()
    statuses: dict[int, int] = {}
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
            for model, path in cases:
                endpoint, base = endpoints[model]
                for value in _values_for(path):
                    r = send(client, endpoint, put(base, path, value))
                    check_response(r, f"{model.__name__} {path} = {str(value)[:60]}")
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    finally:
        victim.stop.set()
        victim.join(120)
    assert not victim.failures, victim.failures[:5]
    assert victim.runs >= 3
    return statuses


def test_every_field_with_the_catalogue(server):
    assert len(CASES) > 100  # the walk found the nested fields too
    statuses = run_catalogue(server, CASES, ENDPOINTS, Victim(server, _reference(server)))
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 500, statuses


def test_pooling_fields_with_the_catalogue(pooling_server):
    assert len(POOLING_CASES) > 40
    r = httpx.post(pooling_server.url + "/score", json=SCORE_VICTIM, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    reference = [d["score"] for d in r.json()["data"]]
    statuses = run_catalogue(pooling_server, POOLING_CASES, POOLING_ENDPOINTS,
                             ScoreVictim(pooling_server, reference))
    assert statuses.get(200, 0) > 50 and statuses.get(400, 0) > 300, statuses


# hypothesis: random hostile values in one to three fields at once
_ints = st.one_of(st.sampled_from(HUGE_INT), st.integers(), st.integers(-3, 130))
_texts = st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=50),
                   st.sampled_from(["\ud800", "x" * 70_000, "\x00", "Hi"]))
_scalars = st.one_of(_ints, st.booleans(), st.none(), _texts,
                     st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(_texts, inner, max_size=3)), max_leaves=12)
_mutations = st.lists(st.tuples(st.sampled_from(CASES), _values), min_size=1, max_size=3)


def test_random_mutations(server):
    victim = Victim(server, _reference(server))
    victim.start()
    client = httpx.Client(base_url=server.url, headers=AUTH, timeout=120)

    @given(mutations=_mutations)
    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    def check(mutations):
        (model, _), _ = mutations[0]
        endpoint, body = ENDPOINTS[model]
        for (m, path), value in mutations:
            if m is model:  # fields of the first mutation's endpoint
                body = put(body, path, value)
        check_response(send(client, endpoint, body), f"{model.__name__} {json.dumps(body)[:300]}")

    try:
        check()
    finally:
        client.close()
        victim.stop.set()
        victim.join(120)
    assert not victim.failures, victim.failures[:5]
