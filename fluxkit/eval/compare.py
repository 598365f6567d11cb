"""Is one evaluation better than another, or is the difference noise? Paired statistics over two results.json files.

`fluxkit eval --compare A B` matches the items of two runs by id (the same prompt, seed and size: the suite and the
task items are deterministic) and reports, per category and overall, both pass rates, the paired difference B - A
with a 95% interval, the discordant counts and McNemar's exact p-value. On the 298-item suite one pass rate's 95%
interval spans 8.3-15.5% at 11.4% (34 of 298), so a 1-point change between two models is not a finding; pairing the
items removes the variance they share (the same hard prompts fail for both) and gives the tighter test.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate (Wilson 1927): unlike the normal one it stays inside [0, 1] and is
    sound at 0 or n passes."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one item, got n={n}")
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value (McNemar 1947): under "no difference" each discordant item is a fair coin."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    n: int
    rate_a: float
    rate_b: float
    only_a: int  # items A passed and B failed
    only_b: int  # items B passed and A failed

    @property
    def difference(self) -> float:
        return self.rate_b - self.rate_a

    @property
    def interval(self) -> tuple[float, float]:
        """95% normal interval of the paired difference: var = ((b + c) - (c - b)^2 / n) / n^2."""
        d = self.difference
        var = max(0.0, (self.only_a + self.only_b) - (self.only_b - self.only_a) ** 2 / self.n) / self.n**2
        half = Z95 * math.sqrt(var)
        return d - half, d + half

    @property
    def p_value(self) -> float:
        return mcnemar_p(self.only_a, self.only_b)


def load_results(path: str | Path) -> dict[str, dict]:
    """A results.json (or the folder holding one) -> {item id: item}, checking that ids are unique."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no evaluation results at {path} (expected a results.json written by `fluxkit eval --out`)")
    try:
        items = json.loads(file.read_text())["items"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a `fluxkit eval` results file: {e}") from None
    by_id = {it["id"]: it for it in items}
    if len(by_id) != len(items):
        raise ValueError(f"{file} repeats item ids")
    return by_id


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict[str, Paired]:
    """Per category (suite) or kind (tasks), and "overall", over the items both runs scored."""
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"the two runs scored different items (only in A: {missing[:5]}, only in B: {extra[:5]}); "
                         "compare runs of the same suite or task, --quick, --seeds, --items and --size")
    groups: dict[str, list[str]] = {}
    for item_id, item in a.items():
        groups.setdefault(item.get("category") or item.get("kind") or "items", []).append(item_id)
    groups["overall"] = list(a)
    out = {}
    for name, ids in groups.items():
        pa = [bool(a[i]["passed"]) for i in ids]
        pb = [bool(b[i]["passed"]) for i in ids]
        out[name] = Paired(len(ids), sum(pa) / len(ids), sum(pb) / len(ids),
                           sum(x and not y for x, y in zip(pa, pb)), sum(y and not x for x, y in zip(pa, pb)))
    return out


def format_comparison(rows: dict[str, Paired], label_a: str, label_b: str) -> str:
    lines = [f"A = {label_a}", f"B = {label_b}",
             f"{'category':<12} {'n':>4} {'A':>6} {'B':>6} {'B - A':>7} {'95% interval':>17} {'A only':>6} "
             f"{'B only':>6} {'p':>6}"]
    for name, r in rows.items():
        lo, hi = r.interval
        lines.append(f"{name:<12} {r.n:>4} {r.rate_a:6.1%} {r.rate_b:6.1%} {100 * r.difference:+6.1f}p "
                     f"[{100 * lo:+6.1f}, {100 * hi:+6.1f}] {r.only_a:>6} {r.only_b:>6} {r.p_value:6.3f}")
    return "\n".join(lines)
