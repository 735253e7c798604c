"""Tiny Hugging Face models built from small configs with seeded random weights (no hub access)."""

from __future__ import annotations

import torch
import transformers as tf

ENCODERS = ["bert", "roberta", "distilbert", "albert", "electra"]
DECODERS = ["llama", "qwen3"]
ALL = ENCODERS + ["vit"] + DECODERS


def tiny(name: str, attn: str = "sdpa", seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    enc = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
               vocab_size=128, max_position_embeddings=64, attn_implementation=attn)
    dec = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, vocab_size=128, max_position_embeddings=64,
               attn_implementation=attn)
    if name == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **enc))
    elif name == "roberta":
        m = tf.RobertaForSequenceClassification(tf.RobertaConfig(num_labels=3, pad_token_id=1, **enc))
    elif name == "distilbert":
        m = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=32, n_layers=layers, n_heads=4, hidden_dim=64, vocab_size=128, max_position_embeddings=64,
            num_labels=3, attn_implementation=attn))
    elif name == "albert":
        m = tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=16, num_labels=3, **enc))
    elif name == "electra":
        m = tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, num_labels=3, **enc))
    elif name == "vit":
        m = tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=3, attn_implementation=attn))
    elif name == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**dec))
    elif name == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **dec))
    else:
        raise ValueError(name)
    return m.eval()


def inputs(name: str, batch: int = 2, length: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    d = {"input_ids": torch.randint(3, 128, (batch, length), generator=g),
         "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if name in DECODERS:
        d["use_cache"] = False
    return d
