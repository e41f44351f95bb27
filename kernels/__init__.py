"""Triton kernels for Quiet-STaR and their pure-PyTorch references (DESIGN.md section 7)."""
from .reference import (
    mixed_logprob_ref,
    sample_thought_tokens_ref,
    thought_attention_ref,
    thought_attention_step_ref,
    token_logprob_ref,
)

# The public names are the Triton kernels; the references (*_ref) and the chunked PyTorch LM head beside them.
from .thought_attention import ThoughtAttentionFunction, thought_attention  # noqa: E402
from .thought_attention import thought_attention_step  # noqa: E402
from .lm_head import mixed_logprob, sample_thought_tokens, token_logprob  # noqa: E402
from .lm_head_chunked import (  # noqa: E402
    mixed_logprob_chunked,
    sample_thought_tokens_chunked,
    token_logprob_chunked,
)

__all__ = [
    "thought_attention", "thought_attention_step", "mixed_logprob", "token_logprob", "sample_thought_tokens",
    "thought_attention_ref", "thought_attention_step_ref", "mixed_logprob_ref", "token_logprob_ref",
    "sample_thought_tokens_ref",
    "mixed_logprob_chunked", "token_logprob_chunked", "sample_thought_tokens_chunked",
]
