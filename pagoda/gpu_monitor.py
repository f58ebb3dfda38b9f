"""Per-GPU gauges (utilization, memory, temperature, power) for /metrics, read from NVML.

Why a custom collector rather than gauges set by a polling thread: NVML is read when Prometheus
scrapes, so the numbers are never stale and nothing runs between scrapes. Where NVML cannot be
used (no `nvidia-ml-py`, no NVIDIA driver, a CPU-only container, CUDA_VISIBLE_DEVICES hiding every
GPU) the collector yields nothing: a CPU deployment exports no GPU series at all instead of zeros
that would look like an idle GPU. Nothing here ever raises into the metrics endpoint.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LABELS = ["gpu", "name"]


def _memory(nvml, handle, field: str) -> float:
    return float(getattr(nvml.nvmlDeviceGetMemoryInfo(handle), field))


# (metric name, help, reader(nvml module, device handle) -> value in the metric's unit)
GAUGES: list[tuple[str, str, Callable[[Any, Any], float]]] = [
    ("pagoda:gpu_utilization_perc", "GPU utilization over the last NVML sample period (0..100).",
     lambda nvml, h: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)),
    ("pagoda:gpu_memory_used_bytes", "GPU memory in use, all processes (bytes).",
     lambda nvml, h: _memory(nvml, h, "used")),
    ("pagoda:gpu_memory_total_bytes", "GPU memory installed (bytes).",
     lambda nvml, h: _memory(nvml, h, "total")),
    ("pagoda:gpu_temperature_celsius", "GPU core temperature (degrees Celsius).",
     lambda nvml, h: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
    ("pagoda:gpu_power_watts", "GPU board power draw (watts).",
     lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),  # NVML reports milliwatts
]
GPU_METRIC_NAMES = [name for name, _, _ in GAUGES]


@functools.lru_cache(maxsize=1)
def _load_nvml():
    """The initialised `pynvml` module, or None when NVML can't be used here (tried once)."""
    try:
        import pynvml
    except ImportError:
        logger.debug("GPU metrics off: nvidia-ml-py is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded / ... on CPU machines
        logger.debug("GPU metrics off: NVML unavailable (%s)", e)
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def visible_indices(nvml, visible: str | None) -> list[int]:
    """NVML indices of the GPUs this process may use, read like CUDA reads CUDA_VISIBLE_DEVICES.

    Entries are indices or GPU UUIDs (a unique prefix is enough); like CUDA, the list ends at the
    first entry that names no device ("-1" hides all). MIG entries can't be mapped to one board
    cheaply, so then every GPU is reported. NVML numbers GPUs in PCI bus order, as CUDA does with
    CUDA_DEVICE_ORDER=PCI_BUS_ID. Inside a container started with `--gpus`, NVML already sees only
    the GPUs given to it.
    """
    count = nvml.nvmlDeviceGetCount()
    if visible is None:
        return list(range(count))
    uuids: list[str] | None = None
    picked: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.startswith("MIG-"):
            return list(range(count))
        if entry.isdigit():
            index = int(entry)
        elif entry.startswith("GPU-"):
            if uuids is None:
                uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
                         for i in range(count)]
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            index = matches[0] if len(matches) == 1 else -1
        else:
            index = -1
        if not 0 <= index < count:
            break
        if index not in picked:
            picked.append(index)
    return picked


class GPUCollector(Collector):
    """prometheus_client collector: one sample per visible GPU for each of GPU_METRIC_NAMES.

    A reading a board doesn't support (power on some cards, for one) is left out for that board
    only; any other NVML failure during a scrape drops the GPU series from that scrape.
    """

    def __init__(self, visible_devices: str | None = None):
        # Read once: the CUDA runtime also fixes its device list when the process starts.
        self._visible = (os.environ.get("CUDA_VISIBLE_DEVICES") if visible_devices is None
                         else visible_devices)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names only, so registering never touches NVML.
        return [GaugeMetricFamily(name, doc, labels=LABELS) for name, doc, _ in GAUGES]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            return self._read()
        except Exception as e:  # a scrape must never fail because of a GPU reading
            logger.warning("GPU metrics skipped in this scrape: %s", e)
            return []

    def _read(self) -> list[GaugeMetricFamily]:
        nvml = _load_nvml()
        if nvml is None:
            return []
        devices = []
        for index in visible_indices(nvml, self._visible):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            devices.append((handle, [str(index), _text(nvml.nvmlDeviceGetName(handle))]))
        if not devices:
            return []
        families = []
        for name, doc, read in GAUGES:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            for handle, labels in devices:
                try:
                    family.add_metric(labels, read(nvml, handle))
                except nvml.NVMLError as e:
                    logger.debug("%s not read for GPU %s: %s", name, labels[0], e)
            families.append(family)
        return families


def gpu_collector_available() -> bool:
    """True when NVML works here and at least one GPU visible to this process can be read."""
    return any(family.samples for family in GPUCollector().collect())
