"""`pagoda serve` with pooling models: /score, /v1/score, /rerank, /v1/rerank, /v2/rerank, /classify,
/pooling, /v1/embeddings (openai SDK) and /invocations, checked against transformers on the same
tiny checkpoints; bad input gets a 4xx with `param` and the engine keeps serving; /load with
--enable-server-load-tracking.
"""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server_utils import PagodaServer
from tiny_pooling import MINILM, build_encoder, set_config

pytestmark = pytest.mark.slow

TOL = 1e-4
QUERY = "what keeps the kv cache small"
DOCS = ["bananas are yellow", "paged attention stores the kv cache in blocks",
        "the quick brown fox", "memory is not wasted with fixed-size blocks"]
SERVE = ["--disable-log-stats", "--disable-log-requests"]


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MINILM)


def hf_model(path: str, cls_name: str):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, **enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0]


def error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ------------------------------------------------------------------------------ cross-encoder

@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> str:
    return build_encoder("bert", str(tmp_path_factory.mktemp("reranker")), num_labels=1, seed=1)


@pytest.fixture(scope="module")
def reranker(reranker_dir):
    with PagodaServer([reranker_dir, "--served-model-name", "reranker", *SERVE]) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
def hf_reranker(reranker_dir, bert_tok):
    model = hf_model(reranker_dir, "BertForSequenceClassification")

    def score(a: str, b: str, last: int | None = None) -> float:
        enc = dict(bert_tok(a, b))
        if last is not None:
            enc = {k: v[-last:] for k, v in enc.items()}
        return torch.sigmoid(hf_logits(model, **enc)).item()
    return score


def test_score_pairing_modes_match_transformers(reranker, hf_reranker, bert_tok):
    one_n = reranker.post("/score", json={"model": "reranker", "text_1": QUERY, "text_2": DOCS}).json()
    assert one_n["object"] == "list" and one_n["model"] == "reranker" and one_n["id"].startswith("score-")
    assert [d["index"] for d in one_n["data"]] == list(range(len(DOCS)))
    assert all(d["object"] == "score" for d in one_n["data"])
    for d, doc in zip(one_n["data"], DOCS):
        assert abs(d["score"] - hf_reranker(QUERY, doc)) < TOL
    n = sum(len(bert_tok(QUERY, doc).input_ids) for doc in DOCS)
    assert one_n["usage"]["prompt_tokens"] == one_n["usage"]["total_tokens"] == n
    one_one = reranker.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS[1]}).json()
    assert len(one_one["data"]) == 1 and abs(one_one["data"][0]["score"] - one_n["data"][1]["score"]) < 1e-6
    n_n = reranker.post("/score", json={"text_1": [DOCS[0], QUERY], "text_2": [DOCS[2], DOCS[3]]}).json()
    assert [round(d["score"], 5) for d in n_n["data"]] == [round(hf_reranker(DOCS[0], DOCS[2]), 5),
                                                          round(hf_reranker(QUERY, DOCS[3]), 5)]
    cut = reranker.post("/score", json={"text_1": QUERY, "text_2": DOCS[1], "truncate_prompt_tokens": 6}).json()
    assert cut["usage"]["prompt_tokens"] == 6
    assert abs(cut["data"][0]["score"] - hf_reranker(QUERY, DOCS[1], last=6)) < TOL


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_orders_documents(reranker, hf_reranker, bert_tok, path):
    want = sorted(range(len(DOCS)), key=lambda i: -hf_reranker(QUERY, DOCS[i]))
    body = {"model": "reranker", "query": QUERY, "documents": DOCS}
    full = reranker.post(path, json=body).json()
    assert full["model"] == "reranker" and full["id"].startswith("rerank-")
    assert [r["index"] for r in full["results"]] == want
    for r in full["results"]:
        assert r["document"] == {"text": DOCS[r["index"]]}
        assert abs(r["relevance_score"] - hf_reranker(QUERY, DOCS[r["index"]])) < TOL
    scores = [r["relevance_score"] for r in full["results"]]
    assert scores == sorted(scores, reverse=True)
    assert full["usage"]["total_tokens"] == sum(len(bert_tok(QUERY, d).input_ids) for d in DOCS)
    top = reranker.post(path, json={**body, "top_n": 2, "return_documents": False}).json()
    assert [r["index"] for r in top["results"]] == want[:2]
    assert all("document" not in r for r in top["results"])
    # Cohere's documents may be objects with a text field; top_n past the end is all of them
    objs = reranker.post(path, json={**body, "documents": [{"text": d} for d in DOCS], "top_n": 10}).json()
    assert [r["index"] for r in objs["results"]] == want


def test_classify_pooling_and_invocations_on_a_cross_encoder(reranker, reranker_dir, bert_tok):
    hf = hf_model(reranker_dir, "BertForSequenceClassification")
    ref = hf_logits(hf, **dict(bert_tok(QUERY)))
    c = reranker.post("/classify", json={"input": [QUERY, DOCS[0]]}).json()
    assert c["id"].startswith("classify-") and len(c["data"]) == 2
    d = c["data"][0]
    assert (d["index"], d["label"], d["num_classes"]) == (0, "class_a", 1)
    assert abs(d["probs"][0] - torch.sigmoid(ref).item()) < TOL
    assert c["usage"]["prompt_tokens"] == len(bert_tok(QUERY).input_ids) + len(bert_tok(DOCS[0]).input_ids)
    p = reranker.post("/pooling", json={"input": QUERY}).json()  # the raw pooler output: the logit
    assert p["data"][0]["object"] == "pooling" and abs(p["data"][0]["data"][0] - ref.item()) < TOL
    b64 = reranker.post("/pooling", json={"input": QUERY, "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(b64["data"][0]["data"]), "<f4")[0] == \
        pytest.approx(p["data"][0]["data"][0], abs=1e-6)
    # /invocations routes by shape: query+documents -> rerank, text_1 -> score, input -> classify
    inv = reranker.post("/invocations", json={"query": QUERY, "documents": DOCS, "top_n": 1}).json()
    direct = reranker.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1}).json()
    assert inv["results"] == direct["results"]
    inv = reranker.post("/invocations", json={"text_1": QUERY, "text_2": DOCS[:2]}).json()
    assert inv["object"] == "list" and [x["object"] for x in inv["data"]] == ["score", "score"]
    inv = reranker.post("/invocations", json={"input": QUERY}).json()
    assert inv["data"][0]["probs"] == c["data"][0]["probs"]


def test_bad_input_is_a_4xx_with_param_and_the_engine_keeps_serving(reranker):
    def post(path, body):
        return reranker.post(path, json=body)
    cases = [
        ("/score", {"text_1": 5, "text_2": "a"}, "text_1"),
        ("/score", {"text_1": "a"}, "text_2"),
        ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2"),
        ("/score", {"text_1": [], "text_2": "a"}, "text_1"),
        ("/score", {"text_1": "a", "text_2": ["b", ""]}, "text_2"),
        ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": "word " * 600}, "text_2"),
        ("/rerank", {"query": "q", "documents": []}, "documents"),
        ("/rerank", {"query": "q", "documents": ["a", ""]}, "documents"),
        ("/rerank", {"query": "q", "documents": "a"}, "documents"),
        ("/rerank", {"query": "q", "documents": [5]}, "documents"),
        ("/rerank", {"documents": ["a"]}, "query"),
        ("/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
        ("/v2/rerank", {"query": ["q"], "documents": ["a"]}, "query"),
        ("/classify", {"input": []}, "input"),
        ("/classify", {"input": [[1, 10 ** 6]]}, "input"),
        ("/classify", {"input": 5}, "input"),
        ("/pooling", {"input": "a", "dimensions": 8}, "dimensions"),
        ("/v1/embeddings", {"input": "a"}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, "model"),
        ("/invocations", {"hello": "there"}, None),
        ("/invocations", {"query": "q", "documents": []}, "documents"),
    ]
    for path, body, param in cases:
        err = error(post(path, body))
        # a field, or an item of it ("documents.0")
        assert err["param"] == param or err["param"].startswith(f"{param}."), (path, body, err)
        assert err["type"] == "invalid_request_error"
    assert error(post("/score", {"model": "nope", "text_1": "a", "text_2": "b"}), 404)["param"] == "model"
    r = reranker.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    ok = post("/score", {"text_1": "a", "text_2": "b"})
    assert ok.status_code == 200 and 0 < ok.json()["data"][0]["score"] < 1


# ------------------------------------------------------------------------------ classifier

def test_classifier_server_labels_and_refused_scores(tmp_path, bert_tok):
    path = build_encoder("xlm-roberta", str(tmp_path / "cls"), num_labels=3, seed=2)
    hf = hf_model(path, "XLMRobertaForSequenceClassification")
    with PagodaServer([path, *SERVE]) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        res = c.post("/classify", json={"input": DOCS}).json()
        for d, doc in zip(res["data"], DOCS):
            probs = torch.softmax(hf_logits(hf, input_ids=bert_tok(doc).input_ids), -1)
            assert np.allclose(d["probs"], probs.numpy(), atol=TOL)
            assert d["label"] == f"class_{'abc'[int(probs.argmax())]}" and d["num_classes"] == 3
        logits = c.post("/classify", json={"input": DOCS[0], "activation": False}).json()
        assert np.allclose(logits["data"][0]["probs"],
                           hf_logits(hf, input_ids=bert_tok(DOCS[0]).input_ids).numpy(), atol=TOL)
        for route, body in (("/score", {"text_1": "a", "text_2": "b"}),
                            ("/rerank", {"query": "a", "documents": ["b"]})):
            err = error(c.post(route, json=body))
            assert err["param"] == "model" and "one label" in err["message"]
        assert c.post("/classify", json={"input": "still serving"}).status_code == 200


# ------------------------------------------------------------------------------ embedding decoder

@pytest.fixture(scope="module")
def qwen3_embed_dir(tmp_path_factory, smollm_side_dir) -> str:
    from conftest import build_tiny
    path = build_tiny("qwen3", str(tmp_path_factory.mktemp("qwen3-embed")), smollm_side_dir, seed=7)
    set_config(path, matryoshka_dimensions=[16, 32])
    return path


def test_embedding_decoder_server(qwen3_embed_dir):
    """Qwen3-Embedding's shape: --runner pooling; the openai SDK's embeddings, Matryoshka
    dimensions, bi-encoder /score and /rerank (cosine), /pooling, /invocations; /load is 0 without
    --enable-server-load-tracking."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(qwen3_embed_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(qwen3_embed_dir)

    def ref(text: str, dims: int | None = None) -> np.ndarray:
        with torch.no_grad():
            h = hf(torch.tensor([tok(text).input_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        return F.normalize(h[:dims], dim=-1).numpy()

    args = [qwen3_embed_dir, "--runner", "pooling", "--served-model-name", "emb", "--max-model-len", "512",
            "--num-gpu-blocks-override", "128", *SERVE]
    with PagodaServer(args) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        client = s.openai_client()
        res = client.embeddings.create(model="emb", input=[QUERY] + DOCS, encoding_format="float")
        vecs = {t: np.asarray(d.embedding) for t, d in zip([QUERY] + DOCS, res.data)}
        for t, v in vecs.items():
            assert v.shape == (64,) and np.allclose(v, ref(t), atol=TOL)
        assert res.usage.prompt_tokens == sum(len(tok(t).input_ids) for t in [QUERY] + DOCS)
        small = client.embeddings.create(model="emb", input=QUERY, dimensions=16, encoding_format="float")
        assert np.allclose(small.data[0].embedding, ref(QUERY, 16), atol=TOL)
        import openai
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="emb", input=QUERY, dimensions=20)
        assert e.value.body["param"] == "dimensions"
        cos = [float(vecs[QUERY] @ vecs[d]) for d in DOCS]  # unit vectors
        sc = c.post("/score", json={"text_1": QUERY, "text_2": DOCS}).json()
        assert np.allclose([d["score"] for d in sc["data"]], cos, atol=TOL)
        # the query is embedded once, not once per document
        assert sc["usage"]["prompt_tokens"] == sum(len(tok(t).input_ids) for t in [QUERY] + DOCS)
        rr = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3}).json()
        assert [r["index"] for r in rr["results"]] == sorted(range(4), key=lambda i: -cos[i])[:3]
        pooled = c.post("/pooling", json={"input": QUERY}).json()["data"][0]["data"]
        assert np.allclose(pooled, ref(QUERY), atol=TOL)
        inv = c.post("/invocations", json={"input": QUERY}).json()
        assert inv["data"][0]["object"] == "embedding"
        assert np.allclose(inv["data"][0]["embedding"], ref(QUERY), atol=TOL)
        assert error(c.post("/classify", json={"input": "a"}))["param"] == "model"
        assert c.get("/load").json() == {"server_load": 0}


# ------------------------------------------------------------------------------ generative: /load, /invocations

def test_load_tracking_and_invocations_on_a_generative_server(tiny_llama_dir):
    args = [tiny_llama_dir, "--served-model-name", "tiny", "--max-model-len", "256",
            "--enable-server-load-tracking", *SERVE]
    with PagodaServer(args) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        assert c.get("/load").json() == {"server_load": 0}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert c.get("/load").json() == {"server_load": 1}  # the stream is in flight
        for _ in range(100):  # the closed stream is aborted and leaves the count
            if c.get("/load").json()["server_load"] == 0:
                break
            import time
            time.sleep(0.05)
        assert c.get("/load").json() == {"server_load": 0}
        chat = c.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 4}).json()
        assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 4
        comp = c.post("/invocations", json={"prompt": "Hello", "max_tokens": 3}).json()
        assert comp["object"] == "text_completion"
        err = error(c.post("/invocations", json={"messages": "hi"}))
        assert err["param"] == "messages"
        for path, body in (("/invocations", {"input": "a"}), ("/score", {"text_1": "a", "text_2": "b"}),
                           ("/rerank", {"query": "a", "documents": ["b"]}), ("/pooling", {"input": "a"})):
            err = error(c.post(path, json=body))
            assert err["param"] == "model" and "generative model" in err["message"]
