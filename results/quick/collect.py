"""Collect the quick-preset trials (runs/quick/NAME/summary.json, history.json) into trials.md.

    python results/quick/collect.py RUNS_DIR NAME:"what it is" ...
"""

import json
import sys
from pathlib import Path

runs = Path(sys.argv[1])  # runs/quick, or results/quick (the committed summaries)
rows = ["| run | what | epochs | test % (single view) | test % (flip TTA) | val % per epoch | train min | img/s |",
        "|---|---|---|---|---|---|---|---|"]
for arg in sys.argv[2:]:
    name, _, what = arg.partition(":")
    d = runs / name
    if not (d / "summary.json").exists():
        rows.append(f"| {name} | {what} | – | (not run) | | | | |")
        continue
    s = json.loads((d / "summary.json").read_text())
    h = json.loads((d / "history.json").read_text())
    val = " ".join(f"{e['val_accuracy_pct']:.1f}" for e in h if "val_accuracy_pct" in e)
    rows.append(f"| {name} | {what} | {s['epochs']} | {s['accuracy_pct']:.2f} | {s.get('flip_tta_accuracy_pct', float('nan')):.2f} "
                f"| {val} | {s['seconds'] / 60:.1f} | {s['train_img_per_s']:.0f} |")
print("\n".join(rows))
