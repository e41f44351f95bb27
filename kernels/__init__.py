"""Triton kernels for Quiet-STaR and their pure-PyTorch references (SPEC section 7)."""
from .reference import (
    mixed_logprob_ref,
    sample_thought_tokens_ref,
    thought_attention_ref,
    thought_attention_step_ref,
    token_logprob_ref,
)

# Until the Triton kernels land, the public names point at the references.
thought_attention = thought_attention_ref
thought_attention_step = thought_attention_step_ref
mixed_logprob = mixed_logprob_ref
token_logprob = token_logprob_ref
sample_thought_tokens = sample_thought_tokens_ref

__all__ = [
    "thought_attention", "thought_attention_step", "mixed_logprob", "token_logprob", "sample_thought_tokens",
    "thought_attention_ref", "thought_attention_step_ref", "mixed_logprob_ref", "token_logprob_ref",
    "sample_thought_tokens_ref",
]
