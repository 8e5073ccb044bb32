"""Reproduce the lab's shipped teacher/student pairs: pretrain both models and measure their properties.

    python scripts/pretrain_lab.py --task order --out src/dopd/lab/pretrained/order --n-eval 300 --threads 1
    python scripts/pretrain_lab.py --task arith --out src/dopd/lab/pretrained/arith --n-eval 300

are the commands that made the shipped pairs (the same as `python -m dopd.lab.models ...`); see
docs/lab_design.md.
"""

from dopd.lab.models import main

if __name__ == "__main__":
    main()
