"""Write (docstring summary -> code) pairs mined from ONE pinned wheel of the codesearch-py suite.

A small real pairs file for a quick training run, e.g. the README's 2,000 networkx pairs:

    python -m scripts.wheel_pairs --package networkx --n 2000 --out runs/networkx_pairs.jsonl
"""
from __future__ import annotations

import argparse
import json
import random

from twotower.common.atomic import write_bytes_atomic
from twotower.common.cache import cache_dir
from twotower.eval.suites.codesearch import PINNED_WHEELS, extract_functions, fetch, normalize_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", default="networkx", help="a package pinned in eval/suites/codesearch.py")
    ap.add_argument("--n", type=int, default=2000, help="number of pairs (random, seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output JSONL (query, positive)")
    args = ap.parse_args()
    pins = [p for p in PINNED_WHEELS if p.name == normalize_name(args.package)]
    if not pins:
        raise SystemExit(f"unknown package '{args.package}': choose {', '.join(p.name for p in PINNED_WHEELS)}")
    (wheel,) = fetch(cache_dir() / "downloads", pins)
    seen_code, seen_query, pairs = set(), set(), []
    for fn in extract_functions(wheel):
        key_q, key_c = (fn.query or "").lower(), " ".join(fn.code.split())
        if fn.query and key_q not in seen_query and key_c not in seen_code:  # no duplicate query or code
            seen_query.add(key_q)
            seen_code.add(key_c)
            pairs.append({"query": fn.query, "positive": fn.code})
    random.Random(args.seed).shuffle(pairs)
    pairs = pairs[: args.n]
    write_bytes_atomic(args.out, "".join(json.dumps(p) + "\n" for p in pairs).encode())
    print(f"{len(pairs)} pairs from {wheel.name} -> {args.out}")


if __name__ == "__main__":
    main()
