"""The executor for one device: the worker lives in the engine core's own process (the
multiprocessing executor for tensor-parallel ranks is a later step)."""
from __future__ import annotations

from pagoda.config import EngineArgs
from pagoda.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, args: EngineArgs):
        self.driver_worker = Worker(args)

    def determine_num_blocks(self) -> int:
        return self.driver_worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.driver_worker.initialize_cache(num_blocks)

    def warm_up(self) -> None:
        self.driver_worker.warm_up()

    def shutdown(self) -> None:
        pass

    def execute_model(self, scheduler_output):
        """Launch one step; returns the worker's pending step (`.result()` waits for it)."""
        return self.driver_worker.execute_model(scheduler_output)
