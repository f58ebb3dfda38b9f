"""The Hugging Face transformers baselines, run the way ../shared/bench/hf_baseline.py runs them:
`generate` on left-padded batches, and continuous batching with `generate_batch`."""
from __future__ import annotations

import gc
import time
import warnings


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def load_model(target):
    """transformers model of the target, on its device, in its dtype."""
    import os
    import torch
    from transformers import AutoModelForCausalLM
    from pagoda.bench import shapes
    dtype = getattr(torch, target.dtype)
    if target.shape:
        return shapes.build_hf_model(target.shape, dtype, target.device)
    kw = dict(dtype=dtype, attn_implementation="sdpa")
    if target.model.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(target.model)),
                                                     gguf_file=os.path.basename(target.model), **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(target.model, **kw)
    return model.to(target.device).eval()


def release(model) -> None:
    import torch
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _config(out_len: int):
    from transformers import GenerationConfig
    # min_new_tokens = max_new_tokens: every request generates exactly out_len tokens
    return GenerationConfig(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                            pad_token_id=0, eos_token_id=None)


def _left_pad(chunk: list[list[int]], device: str):
    import torch
    width = max(map(len, chunk))
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    for j, p in enumerate(chunk):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    return ids.to(device), mask.to(device), width


def generate_static(model, prompts: list[list[int]], out_len: int, batch: int, device: str,
                    progress: bool = False) -> tuple[float, list[int]]:
    """Padded batches through `generate`. Returns (seconds, generated tokens per request)."""
    import torch
    from tqdm import tqdm
    gc_ = _config(out_len)
    counts: list[int] = []
    starts = range(0, len(prompts), batch)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        for i in tqdm(starts, disable=not progress, desc="hf generate", unit="batch"):
            chunk = prompts[i:i + batch]
            ids, mask, width = _left_pad(chunk, device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_)
            counts += [out.shape[1] - width] * len(chunk)
        sync(device)
    return time.perf_counter() - t0, counts


def generate_continuous(model, prompts: list[list[int]], out_len: int, device: str,
                        warmup: bool = True) -> tuple[float, list[int], list[str]]:
    """transformers continuous batching. Returns (seconds, tokens per request, errors)."""
    import torch
    from transformers import GenerationConfig
    gc_ = GenerationConfig(max_new_tokens=out_len, do_sample=False, pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings():
        # newer transformers page the cache without the prefix and warn about it
        warnings.simplefilter("ignore", FutureWarning)
        model.set_attn_implementation("paged|sdpa")
    try:
        with torch.no_grad():
            if warmup:
                model.generate_batch(inputs=prompts[:8], generation_config=gc_, progress_bar=False)
            sync(device)
            t0 = time.perf_counter()
            res = model.generate_batch(inputs=prompts, generation_config=gc_, progress_bar=False)
            sync(device)
            dt = time.perf_counter() - t0
    finally:
        model.set_attn_implementation("sdpa")
    order = sorted(res.values(), key=lambda r: int(str(r.request_id).rsplit("_", 1)[-1]))
    return dt, [len(r.generated_tokens) for r in order], [str(r.error) for r in order if r.error]


class StepClock:
    """A transformers streamer that stamps the time of every generated token step (batch-wide).

    generate() hands the prompt first and then one tensor per step, moved to the CPU, so the
    stamp is taken after the step has finished on the device."""

    def __init__(self):
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_steps(model, prompts: list[list[int]], out_len: int, device: str) -> tuple[float, list[float], int]:
    """One batch through `generate`, timing each step.

    Returns (prefill seconds = start to first token, decode step seconds, tokens per request)."""
    import torch
    ids, mask, width = _left_pad(prompts, device)
    clock = StepClock()
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_config(out_len),
                             streamer=clock)
        sync(device)
    s = clock.stamps
    return s[0] - t0, [b - a for a, b in zip(s, s[1:])], out.shape[1] - width
