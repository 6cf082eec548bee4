#!/usr/bin/env python
"""Tokenize JSONL/text corpora into megatron-core .bin/.idx; see megatron_kd/data/preprocess.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kd.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
