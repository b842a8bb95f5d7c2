"""GPU time per kernel name from an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum
--csv --log-file FILE`), largest first. With a second CSV and a divisor N: (first − second) / N
per kernel name, e.g. the kernels of one decode token from runs with 5 and 1 decode tokens.

    python3 scripts/ncu_kernels.py RUN.csv [BASELINE.csv N]
"""

import collections
import csv
import sys


def kernel_times(path):
    """(GPU ns, launches) per kernel name in one ncu CSV."""
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"no kernel rows in {path}")
    total, count = collections.Counter(), collections.Counter()
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            name = row["Kernel Name"].split("(")[0][:70]
            total[name] += float(row["Metric Value"].replace(",", ""))
            count[name] += 1
    return total, count


def main():
    total, count = kernel_times(sys.argv[1])
    if len(sys.argv) == 4:
        base_total, base_count = kernel_times(sys.argv[2])
        n = float(sys.argv[3])
        total = {k: (total[k] - base_total.get(k, 0.0)) / n for k in total}
        count = {k: (count[k] - base_count.get(k, 0)) / n for k in count}
        total = {k: v for k, v in total.items() if count[k] > 0}
    all_ns = sum(total.values())
    print(f"{sum(count[k] for k in total):.0f} kernels, {all_ns / 1e6:.3f} ms of GPU time")
    for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{ns / 1e6:9.3f} ms {100 * ns / max(all_ns, 1):5.1f}% {count[name]:8.1f}x  {name}")


if __name__ == "__main__":
    main()
