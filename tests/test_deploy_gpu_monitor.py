"""pagoda/gpu_monitor.py: NVML gauges on /metrics, absent (never raising) where there is no GPU.

The machine CI runs on has no NVIDIA driver, so the NVML side is exercised two ways: for real
(whatever this machine has: no GPU here, every GPU on a GPU box) and through a stand-in `pynvml`
module that answers like the real one, to check names, labels, units and device selection.
"""
from __future__ import annotations

import sys
import types

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagoda import gpu_monitor
from pagoda.gpu_monitor import GPU_METRIC_NAMES, GPUCollector, gpu_collector_available


@pytest.fixture(autouse=True)
def fresh_nvml_state():
    gpu_monitor._load_nvml.cache_clear()
    yield
    gpu_monitor._load_nvml.cache_clear()


def scrape(collector) -> dict[str, list]:
    """Register the collector in a fresh registry and parse the text exposition back."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        return False


def test_real_nvml_on_this_machine():
    families = scrape(GPUCollector())
    if real_nvml_works():
        assert gpu_collector_available()
        for name in GPU_METRIC_NAMES:
            assert families[name], name
        for s in families["pagoda:gpu_utilization_perc"]:
            assert 0 <= s.value <= 100
        used = {s.labels["gpu"]: s.value for s in families["pagoda:gpu_memory_used_bytes"]}
        total = {s.labels["gpu"]: s.value for s in families["pagoda:gpu_memory_total_bytes"]}
        assert all(0 < used[g] <= total[g] for g in used)
    else:
        assert not gpu_collector_available()
        assert not any(name.startswith("pagoda:gpu") for name in families)


class Board:
    def __init__(self, name, uuid, util, used, total, temp, milliwatts):
        self.name, self.uuid, self.util = name, uuid, util
        self.used, self.total, self.temp, self.milliwatts = used, total, temp, milliwatts


def fake_pynvml(boards: list[Board], init_error: Exception | None = None,
                count_error: Exception | None = None) -> types.ModuleType:
    """A module with the pynvml calls gpu_monitor makes, backed by `boards`; errors are pynvml's."""
    m = types.ModuleType("pynvml")
    m.NVMLError = pynvml.NVMLError
    m.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def init():
        if init_error:
            raise init_error

    def count():
        if count_error:
            raise count_error
        return len(boards)

    def power(board):
        if board.milliwatts is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return board.milliwatts

    def temperature(board, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return board.temp

    m.nvmlInit = init
    m.nvmlDeviceGetCount = count
    m.nvmlDeviceGetHandleByIndex = lambda i: boards[i]
    m.nvmlDeviceGetName = lambda b: b.name.encode()  # older drivers hand back bytes
    m.nvmlDeviceGetUUID = lambda b: b.uuid
    m.nvmlDeviceGetUtilizationRates = lambda b: types.SimpleNamespace(gpu=b.util, memory=0)
    m.nvmlDeviceGetMemoryInfo = lambda b: types.SimpleNamespace(used=b.used, total=b.total,
                                                                free=b.total - b.used)
    m.nvmlDeviceGetTemperature = temperature
    m.nvmlDeviceGetPowerUsage = power
    return m


BOARDS = [
    Board("NVIDIA H100 80GB HBM3", "GPU-0aaa1111", 87, 70 * 2**30, 80 * 2**30, 61, 512_250),
    Board("NVIDIA A10", "GPU-1bbb2222", 3, 2**30, 24 * 2**30, 35, None),  # no power sensor
    Board("NVIDIA L4", "GPU-2ccc3333", 50, 5 * 2**30, 23 * 2**30, 44, 71_000),
]


@pytest.fixture
def nvml(monkeypatch):
    def install(**kw):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(BOARDS, **kw))
    return install


def values(families, name) -> dict[str, float]:
    return {s.labels["gpu"]: s.value for s in families[name]}


def test_every_gauge_per_board_with_units(nvml):
    nvml()
    families = scrape(GPUCollector(visible_devices=None))
    assert set(GPU_METRIC_NAMES) <= set(families)
    assert values(families, "pagoda:gpu_utilization_perc") == {"0": 87, "1": 3, "2": 50}
    assert values(families, "pagoda:gpu_memory_used_bytes")["0"] == 70 * 2**30
    assert values(families, "pagoda:gpu_memory_total_bytes")["1"] == 24 * 2**30
    assert values(families, "pagoda:gpu_temperature_celsius") == {"0": 61, "1": 35, "2": 44}
    # milliwatts -> watts; the A10 has no power reading and is left out of that gauge only
    assert values(families, "pagoda:gpu_power_watts") == {"0": 512.25, "2": 71.0}
    names = {s.labels["gpu"]: s.labels["name"] for s in families["pagoda:gpu_temperature_celsius"]}
    assert names == {"0": "NVIDIA H100 80GB HBM3", "1": "NVIDIA A10", "2": "NVIDIA L4"}
    assert gpu_collector_available()


@pytest.mark.parametrize("visible, expected", [
    ("2", ["2"]),
    ("2,0", ["2", "0"]),
    ("GPU-1bbb", ["1"]),             # a unique UUID prefix, as CUDA accepts
    ("0,7,2", ["0"]),                # CUDA stops at the first entry naming no device
    ("1,-1,2", ["1"]),
    ("GPU-", []),                    # ambiguous prefix names no device
    ("MIG-4f1d2c", ["0", "1", "2"]),  # MIG instances: report the boards
])
def test_cuda_visible_devices_selects_boards(nvml, visible, expected):
    nvml()
    families = scrape(GPUCollector(visible_devices=visible))
    got = [s.labels["gpu"] for s in families.get("pagoda:gpu_utilization_perc", [])]
    assert got == expected


@pytest.mark.parametrize("visible", ["", "-1"])
def test_all_gpus_hidden_exports_nothing(nvml, monkeypatch, visible):
    nvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert scrape(GPUCollector()) == {}
    assert not gpu_collector_available()


def test_nvml_init_failure_exports_nothing(nvml):
    nvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert scrape(GPUCollector(visible_devices=None)) == {}
    assert not gpu_collector_available()


def test_nvml_failing_mid_scrape_never_raises(nvml):
    nvml(count_error=pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))
    assert scrape(GPUCollector(visible_devices=None)) == {}


def test_missing_nvidia_ml_py_exports_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert scrape(GPUCollector(visible_devices=None)) == {}
    assert not gpu_collector_available()


def test_registering_does_not_touch_nvml(monkeypatch):
    calls = []
    module = fake_pynvml(BOARDS)
    module.nvmlInit = lambda: calls.append("nvmlInit")
    monkeypatch.setitem(sys.modules, "pynvml", module)
    CollectorRegistry().register(GPUCollector())
    assert calls == []
    GPUCollector().collect()
    assert calls == ["nvmlInit"]
