"""Evaluation. :mod:`megatron_kd.eval.passkey`: the passkey retrieval probe the demo uses."""
