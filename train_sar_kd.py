#!/usr/bin/env python
"""The spec's entry point: ``python train_sar_kd.py --teacher_model ... --student_model ...``.

Identical to ``sar-kd train``; see ``python train_sar_kd.py --help``.
"""

import sys

from sar_kd.cli import train_script

if __name__ == "__main__":
    sys.exit(train_script())
