"""Border frame and ripples of refined corpora, side by side (issue 23, item 4).

    python bench/artifacts.py --synthetic D/synthetic --real-test D/real_test \
        --refined "zero padding=OLD/refined" "reflect padding=NEW/refined" [--rows 1000]

Scores the first `--rows` rows of each corpus with `metrics/artifacts.py` (what `evaluate` reports):
the mean gray level of each one-pixel ring in from the edge and the frame score, and the radially
averaged power spectrum with its distance to real_test's. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math

from simgan_dist.data.schema import load_numpy
from simgan_dist.metrics.artifacts import artifact_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", required=True)
    parser.add_argument("--real-test", required=True)
    parser.add_argument("--refined", nargs="+", required=True, help="NAME=DATASET, one per refined corpus")
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()

    def images(uri: str):
        return load_numpy(uri, columns=["image"], limit=args.rows)["image"]

    sets = {"synthetic": images(args.synthetic)}
    for item in args.refined:
        name, uri = item.split("=", 1)
        sets[name] = images(uri)
    sets["real"] = images(args.real_test)
    metrics = artifact_metrics(sets)
    rings = len(metrics["border"]["real"]["ring_mean"])
    print(f"| images | frame score (gray levels) | spectrum distance to real | mean gray level, rings 0–{rings - 1} |")
    print("|---|---|---|---|")
    for name, border in metrics["border"].items():
        distance = metrics["vs_real"].get(name, {}).get("spectrum_log_distance")
        print(f"| {name} | {border['frame_score']:.2f} | {'–' if distance is None else f'{distance:.3f}'} | "
              f"{' '.join(f'{v:.1f}' for v in border['ring_mean'])} |")
    frequencies = metrics["spectrum"]["real"]["frequency"]
    print(f"\n| log10 power, cycles/px → | {' | '.join(f'{f:.2f}' for f in frequencies[::2])} |")
    print("|---|" + "---|" * len(frequencies[::2]))
    for name, spectrum in metrics["spectrum"].items():
        print(f"| {name} | {' | '.join(f'{math.log10(p):.2f}' for p in spectrum['power'][::2])} |")


if __name__ == "__main__":
    main()
