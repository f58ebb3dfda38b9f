"""What a checkpoint's config.json says about its own quantization (`quantization_config`),
checked against --quantization: AWQ and GPTQ (4 bits) and FP8 are run; other formats are refused
with a line naming the flag and the format the checkpoint is in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

CHECKPOINT_METHODS = ("awq", "gptq")  # --quantization values that need a checkpoint's format
CHECKPOINT_FORMATS = CHECKPOINT_METHODS + ("fp8",)  # formats of checkpoints pagoda runs
ONLINE_METHODS = ("fp8", "int4")      # quantized here while loading (int8: pagoda.worker.loader)


@dataclass(frozen=True)
class CheckpointQuant:
    method: str                          # awq | gptq | fp8
    group: int = 0
    block: Optional[tuple[int, int]] = None  # fp8: weight_block_size of weight_scale_inv
    v2_zeros: bool = False               # GPTQ checkpoint_format gptq_v2
    not_converted: tuple[str, ...] = field(default=())  # modules_to_not_convert (kept float)


def checkpoint_format(hf_config) -> Optional[str]:
    """The quant_method of the checkpoint (None: float weights)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return str(qc.get("quant_method", "unknown")).lower()


def resolve(flag: Optional[str], hf_config) -> tuple[Optional[str], Optional[CheckpointQuant]]:
    """(--quantization to run, the checkpoint's format when it is AWQ / GPTQ)."""
    fmt = checkpoint_format(hf_config)
    if fmt is None:
        if flag in CHECKPOINT_METHODS:
            raise ValueError(f"--quantization: {flag} needs an {flag.upper()} checkpoint, but this "
                             "model's weights are not quantized (no quantization_config); use "
                             "fp8, int4 or int8 to quantize it while loading")
        return flag, None
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"--quantization: the checkpoint is quantized as {fmt!r}, which pagoda does "
                         f"not run (supported checkpoint formats: {', '.join(CHECKPOINT_FORMATS)})")
    if flag not in (None, fmt):
        raise ValueError(f"--quantization: the checkpoint is {fmt.upper()}; pass --quantization {fmt} "
                         f"(or leave it out), not {flag}")
    qc = hf_config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if fmt == "fp8":
        block = qc.get("weight_block_size")
        return fmt, CheckpointQuant(fmt, block=tuple(block) if block else None,
                                    not_converted=tuple(qc.get("modules_to_not_convert") or ()))
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"--quantization: {fmt.upper()} checkpoints of {bits} bits are not supported "
                         "(4 bits only)")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if fmt == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"--quantization: AWQ version {qc.get('version')!r} is not supported (gemm only)")
    if fmt == "awq" and not qc.get("zero_point", True):
        raise ValueError("--quantization: AWQ checkpoints without zero points are not supported")
    v2 = str(qc.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    skip = tuple(qc.get("modules_to_not_convert") or ())
    return fmt, CheckpointQuant(fmt, group=group, v2_zeros=v2, not_converted=skip)
