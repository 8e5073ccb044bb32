"""Reproduce the lab's shipped teacher/student pair: pretrain both and measure their properties.

    python scripts/pretrain_lab.py --task arith --out src/dopd/lab/pretrained/arith --n-eval 300

is the command that made the shipped pair (same as `python -m dopd.lab.models ...`); see docs/lab_design.md.
"""

from dopd.lab.models import main

if __name__ == "__main__":
    main()
