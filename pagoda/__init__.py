"""pagoda: LLM inference and serving engine (paged KV cache, continuous batching, OpenAI API)."""
__version__ = "0.1.0"

# name -> module: vLLM's top-level names, imported lazily (`import pagoda` must not pull in torch
# for the CLI's --help)
_EXPORTS = {
    "LLM": "pagoda.llm",
    "SamplingParams": "pagoda.sampling_params",
    "BeamSearchParams": "pagoda.beam_search",
    "PoolingParams": "pagoda.pooling_params",
    "EngineArgs": "pagoda.config",
    "AsyncEngineArgs": "pagoda.engine.arg_utils",
    "AsyncLLMEngine": "pagoda.engine.async_llm_engine",
    "LLMEngine": "pagoda.engine.llm_engine",
    "TextPrompt": "pagoda.inputs.data",
    "TokensPrompt": "pagoda.inputs.data",
    **{name: "pagoda.outputs" for name in (
        "RequestOutput", "CompletionOutput", "PoolingRequestOutput", "EmbeddingRequestOutput",
        "ClassificationRequestOutput", "ScoringRequestOutput")},
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
