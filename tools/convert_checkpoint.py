#!/usr/bin/env python
"""HF <-> project checkpoints; same as `megatron-kd convert` (see docs/interop.md).

    python tools/convert_checkpoint.py hf-to-mcore HF_DIR RUN_DIR [--tensor-model-parallel-size N]
    python tools/convert_checkpoint.py mcore-to-hf RUN_DIR HF_DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
