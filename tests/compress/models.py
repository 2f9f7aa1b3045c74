"""Tiny random models built in memory (no files), for the compression tests."""

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def bert(layers: int = 4, seed: int = 0, vocab: int = 40) -> nn.Module:
    """A BERT classifier: hidden 32, 2 heads, FFN 64, no dropout."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config).eval()


def llama(layers: int = 4, seed: int = 0, vocab: int = 40, tie_word_embeddings: bool = False) -> nn.Module:
    """A Llama LM: hidden 32, 4 query heads over 2 key/value heads (GQA), FFN 64."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()
