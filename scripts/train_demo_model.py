"""Train the backdoored ViT that `atpatch demo` ships (atpatch/lab/demo_vit/): seed 0, the demo's splits.

    python scripts/train_demo_model.py     # 5-10 minutes on 2 busy cores; rewrites atpatch/lab/demo_vit

Training took 5-10 minutes on the shared 2-core machine, past the demo's 2-minute target, so the
weights (160 KB) ship and the demo runs everything after training. On that machine the script
rewrites them bit for bit (same seed, splits and torch build).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from atpatch.demo import CALIBRATION, DEMO_MODEL, SEED, TEST
from atpatch.lab import digits_backdoor as db

EPOCHS = 60  # as the image acceptance test trains


def main() -> int:
    x01, labels = db.load_digits()
    splits = db.make_splits(len(labels), CALIBRATION, TEST, SEED)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        db.train_backdoored_vit(Path(tmp), x01[splits.train], labels[splits.train], seed=SEED, epochs=EPOCHS)
        DEMO_MODEL.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (DEMO_MODEL / name).write_bytes((Path(tmp) / name).read_bytes())
    print(f"trained in {time.time() - start:.0f} s; wrote {DEMO_MODEL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
