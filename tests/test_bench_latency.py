"""`pagoda bench latency` end to end on CPU with a random-weight tiny model: every sweep point
is measured for pagoda and the transformers baseline, with exact token counts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pagoda.entrypoints.cli import main

pytestmark = pytest.mark.timeout(300)


def test_sweep_points_counts_and_step_times(tmp_path, capsys):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    rc = main(["bench", "latency", "--model-shape", "tiny-llama", "--backend", "pagoda,hf", "--batch-size", "1", "3",
               "--input-len", "8", "24", "--output-len", "6", "--disable-tqdm", "--output-json", str(out),
               "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    points = [(r["backend"], r["batch_size"], r["input_len"]) for r in res["results"]]
    assert points == [(b, bs, L) for b in ("pagoda", "hf") for bs in (1, 3) for L in (8, 24)]
    for r in res["results"]:
        assert r["output_tokens"] == r["expected_output_tokens"] == r["batch_size"] * 6 and r["counts_ok"]
        # each prompt fits one prefill step, so 6 tokens = 1 prefill + 5 decode steps
        assert len(r["decode_ms"]) == 5, r
        assert r["prefill_ms"] > 0 and all(d > 0 for d in r["decode_ms"])
        d = r["decode"]
        assert d["mean"] == pytest.approx(np.mean(r["decode_ms"]))
        for p in (50, 90, 99):
            assert d[f"p{p}"] == pytest.approx(np.percentile(r["decode_ms"], p))
        assert "floor_ms" not in r  # no floor on the CPU
    assert res["copy_bandwidth_GBps"] is None
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert printed.count("6/6") == 4 and printed.count("18/18") == 4


def test_num_iters_pools_steps(tmp_path):
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model-shape", "tiny-llama", "--batch-size", "2", "--input-len", "8",
                 "--output-len", "4", "--num-iters", "3", "--disable-tqdm", "--output-json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["output_tokens"] == r["expected_output_tokens"] == 2 * 4 * 3
    assert len(r["decode_ms"]) == 3 * 3


@pytest.mark.parametrize("argv, message", [
    (["--output-len", "1"], "--output-len: must be >= 2"),
    (["--batch-size", "0"], "--batch-size: every value must be >= 1"),
    (["--backend", "hf-cb"], "--backend: hf-cb has no per-step timing"),
])
def test_bad_flags_get_one_line(argv, message, capsys):
    assert main(["bench", "latency", "--model-shape", "tiny-llama", "--disable-tqdm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
