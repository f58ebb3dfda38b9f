"""`pagoda serve` command line: flag groups, precedence (CLI > --config > PAGODA_* env > default),
and one-line errors naming the flag. No model is loaded here."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.openai.cli_args import resolve_args


def parse(*argv: str):
    return resolve_args(build_parser().parse_args(["serve", *argv]))


def run_cli(*argv: str, module: str = "pagoda.entrypoints.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=120)


def test_help_is_grouped_and_shows_aliases():
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    text = out.stdout
    for group in ("Server:", "Model:", "KV cache:", "Scheduler:", "Chat:", "Logging:"):
        assert f"\n{group}\n" in text, group
    for flag in ("--api-key", "--allowed-origins", "--max-concurrent-requests", "--session-len",
                 "--max-batch-size", "--cache-max-entry-count", "--cache-block-seq-len",
                 "--max-prefill-token-num", "--disable-fastapi-docs", "--uvicorn-log-level",
                 "--quantize", "--disable-frontend"):
        assert flag in text, flag
    flat = " ".join(text.split())  # argparse wraps lines anywhere
    assert "PAGODA_API_KEY" in flat and "[default: 8000]" in flat
    # CORS: the default lets any web page call the server; --help says when to set it
    assert "Set it to your web app's origins when browsers can reach the server" in flat
    for flag in ("--request-body-timeout", "--max-connections", "--max-stop-strings",
                 "--max-stop-string-length"):
        assert flag in text, flag
    assert text.index("\nServer:\n") < text.index("\nModel:\n")


def test_module_entry_point_help():
    out = run_cli("--help", module="pagoda.entrypoints.openai.api_server")
    assert out.returncode == 0 and "--tensor-parallel-size" in out.stdout


def test_defaults():
    args = parse()
    assert (args.host, args.port, args.api_key, args.model) == ("127.0.0.1", 8000, None, None)
    assert args.allowed_origins == ["*"] and args.max_concurrent_requests is None
    assert args.enable_prefix_caching is True


def test_positional_model_and_aliases():
    args = parse("some/model", "--session-len", "512", "--max-batch-size", "4", "--cache-block-seq-len", "32")
    assert args.model == "some/model"
    assert (args.max_model_len, args.max_num_seqs, args.block_size) == (512, 4, 32)
    with pytest.raises(ValueError, match="--model"):
        parse("a", "--model", "b")


@pytest.mark.parametrize("spelling", ["--quantization", "--quantize", "-q"])
def test_quantize_is_an_alias_of_quantization(spelling):
    """A guide spells it `--quantize int8`; it sets the same engine field as vLLM's name."""
    args = parse(spelling, "int8")
    assert args.quantization == "int8" and not hasattr(args, "quantize")
    assert parse(spelling, "none").quantization == "none"
    assert parse().quantization is None


def test_quantize_alias_checks_its_value():
    out = run_cli("serve", "--quantize", "int2")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]  # argparse: usage, then the error line
    assert "--quantize" in last and "invalid choice: 'int2'" in last and "int4" in last, out.stderr


def test_precedence_cli_over_config_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_HOST", "10.0.0.1")
    monkeypatch.setenv("PAGODA_MAX_CONCURRENT_REQUESTS", "5")
    monkeypatch.setenv("PAGODA_API_KEY", "from-env")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("host: 0.0.0.0\nport: 8001\nserved_model_name: [a, b]\nenable-prefix-caching: false\n"
                   "allowed-origins: http://x.test,http://y.test\nmax-request-body-size: 1MiB\n")
    args = parse("--config", str(cfg), "--port", "9000")
    assert args.port == 9000                       # command line beats the file
    assert args.host == "0.0.0.0"                  # the file beats the environment
    assert args.max_concurrent_requests == 5       # the environment beats the default
    assert args.api_key == "from-env"
    assert args.served_model_name == ["a", "b"] and args.enable_prefix_caching is False
    assert args.allowed_origins == ["http://x.test", "http://y.test"]
    assert args.max_request_body_size == 1 << 20


def test_explicit_default_value_on_cli_still_beats_config(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 8001\n")
    assert parse("--config", str(cfg), "--port", "8000").port == 8000


@pytest.mark.parametrize("argv, flag", [
    (["--port", "70000"], "--port"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests"),
    (["--ssl-keyfile", "/no/such.key"], "--ssl-keyfile"),
    (["--chat-template", "no-such-template"], "--chat-template"),
    (["--max-request-body-size", "0"], "--max-request-body-size"),
    (["--enable-auto-tool-choice"], "--tool-call-parser"),
    (["--request-body-timeout", "0"], "--request-body-timeout"),
    (["--max-connections", "0"], "--max-connections"),
    (["--max-stop-strings", "0"], "--max-stop-strings"),
    (["--max-stop-string-length", "-1"], "--max-stop-string-length"),
])
def test_bad_server_flags_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse(*argv)


def test_config_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prot: 8000\n")
    with pytest.raises(ValueError, match="unknown flag.*prot"):
        parse("--config", str(cfg))
    cfg.write_text("log-level: loud\n")
    with pytest.raises(ValueError, match="log-level|log_level"):
        parse("--config", str(cfg))
    with pytest.raises(ValueError, match="--config"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_chat_template_file_or_inline(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse("--chat-template", str(f)).chat_template == f.read_text()
    assert parse("--chat-template", "{{ messages }}").chat_template == "{{ messages }}"


@pytest.mark.parametrize("argv, flag", [
    (["serve", "--port", "0"], "--port"),
    (["serve", "--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["serve", "--threads", "0"], "--threads"),
    (["serve", "--quantization", "gguf", "--device", "cuda"], "--quantization"),
])
def test_cli_errors_are_one_line(argv, flag):
    out = run_cli(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], out.stderr
