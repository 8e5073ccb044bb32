"""Remake the lab's shipped teacher/student pairs: pretrain the teacher, choose the student among its checkpoints
(or pretrain a student of its own), and measure the pair's properties.

    python scripts/pretrain_lab.py --task order --out src/dopd/lab/pretrained/order --n-eval 300 --threads 1
    python scripts/pretrain_lab.py --task arith --like-shipped --out src/dopd/lab/pretrained/arith --n-eval 300

The first made the default pair (today's `LabPairConfig` defaults); the second remakes the older `arith` pair from
the config it ships with (a 2 x 48 student of its own). `--pair KEY=VALUE` changes any `LabPairConfig` field. An
alias of `dopd lab pretrain ...` (the pair's lab_pair.json records that command); docs/lab_design.md records every
pair tried.
"""

import sys

from dopd.cli import main

if __name__ == "__main__":
    sys.exit(main(["lab", "pretrain", *sys.argv[1:]]))
