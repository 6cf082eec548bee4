"""Data pipeline: tokenizer, preprocessing to .bin/.idx, packed windows, DP sampling.

megatron-core is imported lazily inside the functions that need it (it takes seconds).
"""
from megatron_kd.data.errors import DataError
from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                      loss_mask_from_tokens, position_ids_from_document_ids)
from megatron_kd.data.sampler import PretrainingSampler, build_data_iterator, collate
from megatron_kd.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

from megatron_kd.data.packed_dataset import PackedDataset, build_packed_datasets, check_data
from megatron_kd.data.preprocess import preprocess
from megatron_kd.data.corpora import iter_offline_corpus, write_jsonl

__all__ = [
    "DataError", "Tokenizer", "load_tokenizer", "train_sentencepiece",
    "document_ids_from_tokens", "position_ids_from_document_ids", "document_attention_mask",
    "loss_mask_from_tokens", "PretrainingSampler", "build_data_iterator", "collate",
    "PackedDataset", "build_packed_datasets", "check_data", "preprocess", "iter_offline_corpus", "write_jsonl",
]
