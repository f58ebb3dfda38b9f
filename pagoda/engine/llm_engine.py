"""LLMEngine: the synchronous front end over in-process engine cores (what `LLM` drives).

add_request tokenizes and validates (InputProcessor), step() runs one engine-core step and turns
its outputs into RequestOutputs (OutputProcessor): the same engine core and the same front-end
code as `pagoda serve`, without the process boundary. With --data-parallel-size N there are N
engine cores; each request goes to the one with the fewest requests, and step() steps each.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Union

from pagoda.config import EngineArgs, data_parallel_rank_args
from pagoda.engine.core_client import InprocClient
from pagoda.engine.output_processor import OutputProcessor
from pagoda.inputs.audio import AudioProcessor
from pagoda.inputs.preprocess import InputProcessor, PromptType
from pagoda.outputs import PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.engine")


class LLMEngine:
    def __init__(self, args: EngineArgs):
        t0 = time.perf_counter()
        from pagoda.worker import loader
        from pagoda.worker.model_config import eos_token_ids
        self.args = args
        self.engine_cores = [InprocClient(data_parallel_rank_args(args, r))
                             for r in range(args.data_parallel_size)]
        self.engine_core = self.engine_cores[0]
        self._engine_of: dict[str, InprocClient] = {}   # engine request id -> its engine core
        core = self.engine_core.core
        self.model_config = core.model_config
        worker = core.worker
        startup = worker.startup
        startup.started_at(t0, "imports")
        if len(self.engine_cores) > 1:
            startup.mark("other data-parallel engine cores")
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(
            worker.source, args.trust_remote_code)
        startup.mark("tokenizer")
        self.model_config.eos_token_ids = eos_token_ids(worker.source, self.model_config.hf_config,
                                                        self.tokenizer)
        from pagoda.inputs.multimodal import MultiModalProcessor
        self.processor = InputProcessor(self.model_config, self.tokenizer, args.max_logprobs,
                                        MultiModalProcessor.for_model(worker.source, self.model_config,
                                                                      self.tokenizer, args),
                                        AudioProcessor.for_model(self.model_config, worker.source.config_dir,
                                                                 self.tokenizer))
        self.output_processor = OutputProcessor(self.tokenizer)
        # False: step() reports only finished requests (offline batches skip per-step outputs)
        self.stream_outputs = True
        startup.mark("front end")
        logger.info("%s", startup.line("LLM startup"))

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
            core = self._least_loaded()
            self._engine_of[r.request_id] = core
            core.add_request(r)

    def _least_loaded(self) -> InprocClient:
        if len(self.engine_cores) == 1:
            return self.engine_core
        return min(self.engine_cores, key=lambda c: len(c.core.scheduler.requests))

    def _abort(self, engine_ids: list[str]) -> None:
        for eid in engine_ids:
            core = self._engine_of.pop(eid, None)
            if core is not None:
                core.abort_requests([eid])

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        ids, out = self.output_processor.abort_request(request_id)
        self._abort(ids)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.parents) or any(c.has_work() for c in self.engine_cores)

    def shutdown(self) -> None:
        """Stop the engine cores' worker processes (tensor-parallel ranks), if any."""
        for c in self.engine_cores:
            c.core.shutdown()

    def step(self) -> list[Union[RequestOutput, PoolingRequestOutput]]:
        results = []
        for core in self.engine_cores:
            if len(self.engine_cores) > 1 and not core.has_work():
                continue
            out = core.step()
            res, to_abort = self.output_processor.process_outputs(
                out.outputs, out.timestamp, final_only=not self.stream_outputs)
            for o in out.outputs:
                if o.finished:
                    self._engine_of.pop(o.request_id, None)
            self._abort(to_abort)
            self.last_stats = out.scheduler_stats
            results += res
        return results
