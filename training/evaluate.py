"""Evaluate a VisualAD model on a benchmark (SPEC §7); the same as `visualad evaluate`, launchable with accelerate.

    python training/evaluate.py --model M --dataset mvtec --data-dir /data/mvtec --output eval/mvtec
    accelerate launch --num_processes 4 training/evaluate.py --model M --dataset visa --data-dir /data/visa \
        --output eval/visa

Each process evaluates a contiguous run of batches; the metric states are gathered with accelerate's `gather_object`
and the main process computes, so the numbers equal a single-process run's. On CPU-only machines, several processes need
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...` (`--device cpu` alone runs one process).
"""

import sys

from visualad_hf.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
