#!/usr/bin/env python
"""Print the validation metrics of finished runs side by side, as a Markdown table.

    python tools/compare.py outputs/camvid-teacher outputs/camvid-alone outputs/camvid-aicsd

Each argument is an output folder of train_icsd.py (it reads ``all_results.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def table(folders: Sequence[Path]) -> str:
    """One row per run: folder, objective, optimizer steps and the three metrics in %."""
    lines = ["| run | --distill | steps | mIoU (%) | mean acc (%) | pixel acc (%) |", "|---|---|---|---|---|---|"]
    for folder in folders:
        res = json.loads((folder / "all_results.json").read_text())
        cells = ["n/a" if res.get(f"eval_{k}") is None else f"{100 * res[f'eval_{k}']:.2f}"
                 for k in ("mean_iou", "mean_accuracy", "overall_accuracy")]
        lines.append(f"| {folder.name} | {res.get('distill', '?')} | {res.get('train_steps', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; a folder without ``all_results.json`` is a one-line error."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="Output folders of finished train_icsd.py runs.")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "all_results.json").is_file()]
    if missing:
        print(f"compare.py: error: no all_results.json in {', '.join(missing)} (is the run finished?)", file=sys.stderr)
        return 2
    print(table(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
