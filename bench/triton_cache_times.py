"""When each kernel in a Triton cache folder was compiled: one line per compiled variant, oldest first, with its
seconds after the first, and one `TRITON_CACHE_RESULT {json}` line (the count per kernel name).

Run after serving runs that pointed `TRITON_CACHE_DIR` at an emptied folder: variants compiled during a run
rather than at the engine's start-up warm-up show up as late entries, each of which stalled a step.

    python bench/triton_cache_times.py --cache /tmp/cold-cache --clear   # before the runs
    python bench/triton_cache_times.py --cache /tmp/cold-cache           # after them
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
from pathlib import Path


def compiled(cache: Path) -> list[tuple[float, str]]:
    """(file time, kernel name) of every compiled variant in the cache (a folder per variant, holding
    `NAME.json` metadata beside `__grp__NAME.json`)."""
    out = []
    for meta in cache.glob("*/*.json"):
        if meta.name.startswith("__grp__"):
            continue
        try:
            name = json.loads(meta.read_text()).get("name", meta.stem)
        except (OSError, ValueError):
            continue
        out.append((meta.stat().st_mtime, name))
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="the TRITON_CACHE_DIR the runs use")
    p.add_argument("--clear", action="store_true", help="empty the folder (before the runs) and print nothing")
    args = p.parse_args()
    if args.clear:
        shutil.rmtree(args.cache, ignore_errors=True)
        return
    rows = compiled(Path(args.cache))
    first = rows[0][0] if rows else 0.0
    for t, name in rows:
        print(f"{t - first:8.1f} s  {name}")
    counts = collections.Counter(name for _, name in rows)
    print("TRITON_CACHE_RESULT " + json.dumps({"variants": len(rows), "by_kernel": dict(counts)}))


if __name__ == "__main__":
    main()
