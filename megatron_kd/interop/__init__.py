"""Hugging Face interop: Llama-family checkpoints <-> project run directories (docs/interop.md)."""
