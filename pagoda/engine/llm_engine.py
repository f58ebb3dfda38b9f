"""LLMEngine: the synchronous front end over an in-process engine core (what `LLM` drives).

add_request tokenizes and validates (InputProcessor), step() runs one engine-core step and turns
its outputs into RequestOutputs (OutputProcessor): the same engine core and the same front-end
code as `pagoda serve`, without the process boundary.
"""
from __future__ import annotations

import time
from typing import Optional, Union

from pagoda.config import EngineArgs
from pagoda.engine.core_client import InprocClient
from pagoda.engine.output_processor import OutputProcessor
from pagoda.inputs.preprocess import InputProcessor, PromptType
from pagoda.outputs import PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, args: EngineArgs):
        from pagoda.worker import loader
        from pagoda.worker.model_config import eos_token_ids
        self.args = args
        self.engine_core = InprocClient(args)
        core = self.engine_core.core
        self.model_config = core.model_config
        worker = core.worker
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(
            worker.source, args.trust_remote_code)
        self.model_config.eos_token_ids = eos_token_ids(worker.source, self.model_config.hf_config,
                                                        self.tokenizer)
        from pagoda.inputs.multimodal import MultiModalProcessor
        self.processor = InputProcessor(self.model_config, self.tokenizer, args.max_logprobs,
                                        MultiModalProcessor.for_model(worker.source, self.model_config,
                                                                      self.tokenizer, args))
        self.output_processor = OutputProcessor(self.tokenizer)
        # False: step() reports only finished requests (offline batches skip per-step outputs)
        self.stream_outputs = True

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    @property
    def core(self):
        """The EngineCore itself (scheduler, KV-cache manager, model executor)."""
        return self.engine_core.core

    def add_request(self, request_id: str, prompt: PromptType,
                    params: Union[SamplingParams, PoolingParams],
                    arrival_time: Optional[float] = None) -> None:
        if request_id in self.output_processor:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival = arrival_time or time.time()
        text, ids, reqs = self.processor.process(request_id, prompt, params, arrival)
        self.output_processor.add_request(request_id, text, ids, params, [r.request_id for r in reqs],
                                          arrival)
        for r in reqs:
            self.engine_core.add_request(r)

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        ids, out = self.output_processor.abort_request(request_id)
        self.engine_core.abort_requests(ids)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents) or self.engine_core.has_work()

    def step(self) -> list[Union[RequestOutput, PoolingRequestOutput]]:
        out = self.engine_core.step()
        results, to_abort = self.output_processor.process_outputs(out.outputs, out.timestamp)
        self.engine_core.abort_requests(to_abort)
        self.last_stats = out.scheduler_stats
        if self.stream_outputs:
            return results
        return [r for r in results if r.finished]
