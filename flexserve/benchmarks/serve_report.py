"""The report of `flexserve bench serve`: a table of the headline figures, CDF plots, and per-request
records written to CSV and read back (to plot runs made apart on one figure)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..scheduler.metrics import RequestRecord

TABLE_COLUMNS = ["scheduler", "finished", "failed", "throughput_tok_s", "throughput_req_s", "ttft_mean_s",
                 "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s", "jct_mean_s", "jct_p50_s",
                 "jct_p99_s", "queueing_frac", "fraction_of_bound"]


def format_table(rows: list[dict]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot_cdfs(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "jct_s", "job completion time"), (axes[1], "ttft_s", "time to first token")):
        for run in runs:
            values = np.sort([getattr(r, key) for r in run["records"]])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=run["row"]["scheduler"])
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_records(runs: list[dict], path: str) -> None:
    """Per-request records of every run, with the run's scheduler, as CSV (`read_records` reads them back)."""
    import csv

    names = [f.name for f in dataclasses.fields(RequestRecord)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scheduler", *names])
        for run in runs:
            for rec in run["records"]:
                w.writerow([run["row"]["scheduler"], *(getattr(rec, n) for n in names)])


def read_records(paths: list[str]) -> list[dict]:
    """Runs from `write_records` files (plain or .gz), in file order, one run per scheduler name per file.
    `PATH=LABEL` names the file's run LABEL (two runs of one policy with different flags), or its runs
    "LABEL: scheduler" when it holds several."""
    import csv
    import gzip

    from ..errors import ConfigError

    types = {f.name: f.type for f in dataclasses.fields(RequestRecord)}
    cast = {"str": str, "int": int, "float": float, "float | None": lambda v: float(v) if v else None}
    runs: list[dict] = []
    for entry in paths:
        path, _, label = entry.partition("=")
        by_name: dict[str, list[RequestRecord]] = {}
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", newline="") as f:
                for row in csv.DictReader(f):
                    name = row.pop("scheduler")
                    by_name.setdefault(name, []).append(RequestRecord(**{k: cast[types[k]](v) for k, v in row.items()}))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: not a --records file ({e})") from e
        for name, recs in by_name.items():
            shown = (label if len(by_name) == 1 else f"{label}: {name}") if label else name
            runs.append({"row": {"scheduler": shown}, "records": recs})
    return runs


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def clean_json(v):
    """A value JSON can carry: NaN and infinities (a figure with no samples) become null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
