"""The model runner's persistent per-request state.

Every request the scheduler has sent keeps a slot (a row) here from its first step until it
finishes: its tokens, block table and counters live in preallocated numpy arrays, so a step's
inputs (token ids, positions, slot mapping, sequence lengths) are gathered for all scheduled
rows at once instead of being rebuilt request by request. Tokens sampled on the device but not
read back yet sit in the arrays as placeholders until the runner resolves them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token not read back yet (its value is on the device)


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: Optional[SamplingParams]
    pooling_params: Optional[PoolingParams]
    block_ids: list[int]
    num_computed_tokens: int
    token_type_ids: Optional[list[int]] = None
    generator: Optional[torch.Generator] = None
    output_token_ids: list[int] = field(default_factory=list)  # PLACEHOLDER until resolved
    num_prompt_logprobs: int = 0  # prompt positions whose logprob rows were returned

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int):
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max(max_blocks_per_req, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.requests: dict[str, CachedRequestState] = {}
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.requests

    def add(self, state: CachedRequestState) -> int:
        if not self._free_rows:
            raise RuntimeError(f"more than {self.max_num_reqs} requests in the batch")
        row = self._free_rows.pop()
        self.requests[state.req_id] = state
        self.row_of[state.req_id] = row
        n_prompt = len(state.prompt_token_ids)
        self.token_ids[row, :n_prompt] = state.prompt_token_ids
        n_out = len(state.output_token_ids)
        if n_out:
            self.token_ids[row, n_prompt:n_prompt + n_out] = state.output_token_ids
        self.num_prompt_tokens[row] = n_prompt
        self.num_tokens[row] = n_prompt + n_out
        self.num_computed_tokens[row] = state.num_computed_tokens
        self.set_blocks(state.req_id, state.block_ids)
        return row

    def remove(self, req_id: str) -> Optional[CachedRequestState]:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self._free_rows.append(self.row_of.pop(req_id))
        return state

    def set_blocks(self, req_id: str, block_ids: list[int]) -> None:
        row = self.row_of[req_id]
        n = len(block_ids)
        if n > self.block_table.shape[1]:
            raise RuntimeError(f"request {req_id} has {n} blocks, more than max_model_len allows")
        self.block_table[row, :n] = block_ids
        self.num_blocks[row] = n

    def append_blocks(self, req_id: str, new_blocks: list[int]) -> None:
        if not new_blocks:
            return
        row = self.row_of[req_id]
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(new_blocks)] = new_blocks
        self.num_blocks[row] = start + len(new_blocks)

    def append_token(self, req_id: str, token: int) -> int:
        """Append a (placeholder) output token; returns its index in output_token_ids."""
        state = self.requests[req_id]
        row = self.row_of[req_id]
        n = int(self.num_tokens[row])
        self.token_ids[row, n] = token
        self.num_tokens[row] = n + 1
        state.output_token_ids.append(token)
        return len(state.output_token_ids) - 1

    def set_token(self, req_id: str, index: int, token: int) -> None:
        """Resolve output token `index` of a request (a no-op for requests that are gone)."""
        state = self.requests.get(req_id)
        if state is None or index >= len(state.output_token_ids):
            return
        state.output_token_ids[index] = token
        self.token_ids[self.row_of[req_id], len(state.prompt_token_ids) + index] = token
