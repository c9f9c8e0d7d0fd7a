"""Evaluate a Sa2VA checkpoint on a vessel data set, or compare two evaluations image by image.

    python evaluate.py --model DIR --data DIR [--out DIR] [--path forward|generate|both]
                       [--save-masks] [--overlays N] [--batch-size B] [--trust-remote-code] ...
    python evaluate.py --compare A/results.json B/results.json [--json OUT.json] [--metrics dice,cldice]
    torchrun --nproc_per_node N evaluate.py --model DIR --data DIR ...

See docs/evaluation.md.
"""

from sa2va.errors import run_cli
from sa2va.evaluation import main

if __name__ == "__main__":
    run_cli(main)
