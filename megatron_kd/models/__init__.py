"""Student/teacher model builders on megatron-core GPTModel."""
from megatron_kd.models.builder import build_model, padded_vocab_size  # noqa: F401
