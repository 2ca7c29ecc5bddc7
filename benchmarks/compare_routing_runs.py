"""Compares two folders of routing_sim.py results: every figure but wall-clock timings, and the digest of
every ranking, must be equal. Exit status 1 if anything differs.

    .venv/bin/python benchmarks/compare_routing_runs.py BEFORE_DIR AFTER_DIR
"""

import json
import sys
from pathlib import Path

TIMINGS = {"decision_p50_us", "decision_p99_us", "sim_wall_s"}


def main(before: Path, after: Path) -> int:
    same_everywhere = True
    for path in sorted(before.glob("*.json")):
        rows_before = json.loads(path.read_text())
        rows_after = json.loads((after / path.name).read_text())
        if len(rows_before) != len(rows_after):
            print(f"{path.name}: {len(rows_before)} runs before, {len(rows_after)} after")
            same_everywhere = False
            continue
        for b, a in zip(rows_before, rows_after, strict=True):
            differs = sorted(k for k in b if k not in TIMINGS and b[k] != a.get(k))
            same_everywhere &= not differs
            print(f"{path.stem:8s} rate {b['rate']:6.1f} {b['policy']:13s} {b['requests']:5d} requests "
                  f"decisions {b['decisions_sha256'][:12]} {'identical' if not differs else f'DIFFER in {differs}'}"
                  f"  (TTFT p90 {b['ttft_p90']:.3f} s, hit {b['hit_rate']:.3f}, reasons {b['reasons']})")
    print("ALL IDENTICAL" if same_everywhere else "DIFFERENCES FOUND")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
