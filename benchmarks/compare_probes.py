"""Paired comparison of two caption probes (`fluxkit eval --probe --out DIR`) run on the same items.

    python -m benchmarks.compare_probes runs/probe/text256-tiny-base-c1-7000 runs/probe/text256-s1-800

Per attribute (sign text also split into listed words and random letters): how often each model prefers the true
caption (its error strictly lower), the items only one of them gets right, and McNemar's exact p over those. The
probe's items are deterministic for a seed, size and item count, so two runs with the same settings hold the same
captions; anything else is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fluxkit.data.scenes import WORDS
from fluxkit.eval.compare import mcnemar_p


def _items(folder: Path) -> list[dict]:
    path = folder / "probe.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no probe.json (write one with fluxkit eval --probe --out {folder})")
    return json.loads(path.read_text())["items"]


def _group(item: dict) -> str:
    if item["attribute"] != "text":
        return item["attribute"]
    quoted = {f"'{w}'" for w in WORDS} | {f'"{w}"' for w in WORDS}
    return "text, listed" if any(q in item["caption"] for q in quoted) else "text, random"


def compare_probes(a: Path, b: Path) -> dict[str, dict]:
    """{group: {n, a, b, only_a, only_b, p}} over the items two probe runs share, in the order first seen."""
    items_a, items_b = _items(a), _items(b)
    keys = [[(i["attribute"], i["caption"], i["counterfactual"]) for i in items] for items in (items_a, items_b)]
    if keys[0] != keys[1]:
        raise ValueError(f"{a} and {b} probed different items (run both with the same --items, seed and size)")
    rows: dict[str, dict] = {}
    for x, y in zip(items_a, items_b, strict=True):
        ok_a, ok_b = (i["error_true"] < i["error_counterfactual"] for i in (x, y))
        for group in (_group(x), "overall"):
            row = rows.setdefault(group, {"n": 0, "a": 0, "b": 0, "only_a": 0, "only_b": 0})
            row["n"] += 1
            row["a"] += ok_a
            row["b"] += ok_b
            row["only_a"] += ok_a and not ok_b
            row["only_b"] += ok_b and not ok_a
    for row in rows.values():
        row["p"] = mcnemar_p(row["only_a"], row["only_b"])
    rows["overall"] = rows.pop("overall")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="probe folder A")
    p.add_argument("b", type=Path, help="probe folder B")
    args = p.parse_args(argv)
    try:
        rows = compare_probes(args.a, args.b)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{'attribute':<14} {'n':>4} {'A':>7} {'B':>7} {'A only':>7} {'B only':>7} {'p':>7}")
    for name, r in rows.items():
        print(f"{name:<14} {r['n']:4d} {r['a'] / r['n']:7.1%} {r['b'] / r['n']:7.1%} {r['only_a']:7d} "
              f"{r['only_b']:7d} {r['p']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
