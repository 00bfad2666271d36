"""Geometry presets of the synthetic checkpoints, kept free of torch so suites validate fast."""

from __future__ import annotations

from typing import Any

# Shared by every preset: Llama 3.1's config.json values.
LLAMA31_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    # Llama 3.1's own value; some transformers 5.x releases warn about a "Mistral regex" without it.
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

PRESETS: dict[str, dict[str, int]] = {
    # Milliseconds per forward on a CPU; real vocabulary so tokenizer and lm_head are full size.
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2},
    "llama3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                     "num_attention_heads": 64, "num_key_value_heads": 8},
}

# Presets whose weights are trained, not drawn (`bench make-model DIR --preset recall`, worker.recall).
TRAINED_PRESETS: dict[str, str] = {
    "recall": "a 2-layer Llama trained on associative recall: the reference model of top-k accuracy claims",
}
