#!/usr/bin/env python3
"""Submit a disttrain run to SLURM: a thin script over `disttrain.launch.submit` (also `disttrain submit`).

    python launch/submit.py --config configs/tiny_gpt.yaml --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 24:00:00 optim.lr=3e-4

`--help` lists every flag; `--dry-run` prints the sbatch script and the resolved config.
"""

import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`: the package sits next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain.launch.submit import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
