"""How results leave a benchmark: percentile summaries, an aligned terminal table, JSON, and
PNG plots (matplotlib, imported only when a plot is asked for)."""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without needing numpy."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (NaN when there are no values)."""
    out = {"mean": (sum(values) / len(values)) if values else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    raw = [list(r) for r in rows]
    cells = [[fmt(c) for c in r] for r in raw]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r, rr in zip(cells, raw):
        parts = []
        for i, (c, w) in enumerate(zip(r, widths)):
            numeric = isinstance(rr[i], (int, float)) or c == "-"
            parts.append(c.rjust(w) if numeric and i else c.ljust(w))
        lines.append("  ".join(parts))
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column block: label left, value right."""
    width = max(len(k) for k, _ in pairs)
    vals = [fmt(v) for _, v in pairs]
    vw = max(len(v) for v in vals)
    lines = [title, "=" * (width + vw + 2)] if title else []
    lines += [f"{k.ljust(width)}  {v.rjust(vw)}" for (k, _), v in zip(pairs, vals)]
    return "\n".join(lines)


def _clean(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(obj), f, indent=1)
        f.write("\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_serve(results: Sequence[dict], path: str, bin_s: float | None = None) -> None:
    """One row per run: TTFT, TPOT and ITL distributions, and output tokens/s over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), 4, figsize=(18, 3.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        ok = [r for r in res["requests"] if not r["error"]]
        label = res.get("label") or res["config"]["base_url"]
        for ax, key, name in ((row[0], "ttft_ms", "TTFT"), (row[1], "tpot_ms", "TPOT"),
                              (row[2], "itl_ms", "ITL")):
            if key == "itl_ms":
                vals = [v for r in ok for v in r["itl_ms"]]
            else:
                vals = [r[key] for r in ok if r[key] is not None]
            if vals:
                ax.hist(vals, bins=min(40, max(5, len(vals) // 2)), color="tab:blue", alpha=0.8)
                s = summarize(vals)
                for p, style in (("p50", "-"), ("p99", "--")):
                    ax.axvline(s[p], color="tab:red", linestyle=style, label=f"{p} {s[p]:.1f} ms")
                ax.legend(fontsize=8)
            ax.set_title(f"{label}: {name}", fontsize=9)
            ax.set_xlabel("ms")
        _throughput_over_time(row[3], ok, bin_s)
        row[3].set_ylim(bottom=0)
        row[3].set_title(f"{label}: output tokens/s over time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_over_time(ax, ok: Sequence[dict], bin_s: float | None, label: str | None = None) -> None:
    """Output tokens per second in bins of bin_s (default: about 40 bins, at least 1 s), from the
    arrival time of every text chunk."""
    # each text chunk stands for output_tokens / chunks tokens (servers may send several per chunk)
    times = [(t, r["output_tokens"] / len(r["token_times_s"])) for r in ok for t in r["token_times_s"]]
    if times:
        end = max(t for t, _ in times)
        bin_s = bin_s or max(1.0, math.ceil(end / 40))
        nbins = max(1, math.ceil(end / bin_s))
        counts = [0.0] * nbins
        for t, w in times:
            counts[min(nbins - 1, int(t / bin_s))] += w
        widths = [bin_s] * (nbins - 1) + [max(end - (nbins - 1) * bin_s, 1e-3)]  # last bin is partial
        rates = [c / w for c, w in zip(counts, widths)]
        ax.step([i * bin_s for i in range(nbins)] + [end], rates + rates[-1:], where="post", label=label)
    ax.set_xlabel("s since start")
    ax.set_ylabel("output tokens/s")


def plot_serve_compare(results: Sequence[dict], path: str, title: str = "", bin_s: float | None = None) -> None:
    """Several runs side by side: aggregate output tokens/s, ITL and TTFT distributions, and
    output tokens/s over time."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    labels = [r["label"] for r in results]
    oks = [[q for q in r["requests"] if not q["error"]] for r in results]
    tput = [r["summary"]["output_throughput"] for r in results]
    bars = axes[0].bar(range(len(results)), tput, color=[f"C{i}" for i in range(len(results))])
    for b, v in zip(bars, tput):
        axes[0].annotate(f"{v:,.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    axes[0].set_xticks(range(len(results)), labels, fontsize=8, rotation=15)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("aggregate output throughput")
    for ax, key, name in ((axes[1], "itl_ms", "inter-token latency"), (axes[2], "ttft_ms", "time to first token")):
        data = [([v for q in ok for v in q[key]] if key == "itl_ms" else [q[key] for q in ok]) or [math.nan]
                for ok in oks]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(results) + 1), labels, fontsize=8, rotation=15)
        ax.set_ylabel("ms")
        ax.set_title(f"{name} (p50, quartiles, whiskers)")
        finite = [v for d in data for v in d if v == v and v > 0]
        if finite and max(finite) / min(finite) > 100:  # queued requests dwarf the rest
            ax.set_yscale("log")
            ax.set_ylabel("ms (log scale)")
    for i, ok in enumerate(oks):
        _throughput_over_time(axes[3], ok, bin_s, labels[i])
    axes[3].set_ylim(bottom=0)
    axes[3].legend(fontsize=8)
    axes[3].set_title("output tokens/s over time")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str, path: str) -> None:
    """A bar per backend/run, its value written on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels)), 4))
    bars = ax.bar(labels, values, color="tab:blue")
    for b, v in zip(bars, values):
        ax.annotate(f"{v:,.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(runs: Sequence[dict], path: str) -> None:
    """Per sweep point: decode step-time distribution (box) and prefill time (bar)."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(runs) + 4), 4.5))
    labels = [f"{r['backend']}\nb{r['batch_size']} in{r['input_len']}" for r in runs]
    a1.boxplot([r["decode_ms"] or [math.nan] for r in runs], showfliers=False)
    a1.set_xticks(range(1, len(runs) + 1), labels, fontsize=7)
    floors = [r.get("floor_ms") for r in runs]
    if any(f is not None for f in floors):
        a1.scatter(range(1, len(runs) + 1), [f if f is not None else math.nan for f in floors],
                   marker="_", s=400, color="tab:red", label="memory-bandwidth floor")
        a1.legend(fontsize=8)
    a1.set_ylabel("ms per decode step")
    a1.set_title("decode time per token")
    a2.bar(range(len(runs)), [r["prefill_ms"] for r in runs], color="tab:green")
    a2.set_xticks(range(len(runs)), labels, fontsize=7)
    a2.set_ylabel("ms")
    a2.set_title("prefill time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
