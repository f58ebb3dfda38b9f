"""pagoda: LLM inference and serving engine (paged KV cache, continuous batching, OpenAI API)."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs", "__version__"]


def __getattr__(name):  # lazy: `import pagoda` must not pull in torch for the CLI's --help
    if name == "LLM":
        from pagoda.llm import LLM
        return LLM
    if name == "SamplingParams":
        from pagoda.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from pagoda import outputs
        return getattr(outputs, name)
    if name == "EngineArgs":
        from pagoda.config import EngineArgs
        return EngineArgs
    raise AttributeError(name)
