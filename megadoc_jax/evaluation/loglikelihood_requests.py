"""Token ids of a (context, continuation) log-likelihood request, exactly as lm-eval's HF backend makes them.

lm-evaluation-harness 0.4.x (TemplateLM.loglikelihood, _encode_pair, HFLM.tok_encode, _loglikelihood_tokens):

- trailing whitespace of the context moves to the front of the continuation;
- whole = encode(context + continuation), ctx = encode(context), continuation ids = whole[len(ctx):], where
  encode uses the tokenizer's default special tokens (a Llama tokenizer puts BOS in front of both), except
  that a string already starting with the prefix token's text gets no special tokens;
- an empty context becomes the prefix token (BOS, else EOS) in front of the continuation encoded without
  special tokens (or the continuation's own first token, if that is the prefix token);
- the model reads (ctx + cont)[-(max_length + 1):][:-1]: a request longer than the model's context is cut
  from the left, and the last len(cont) positions predict the continuation.

A scorer implements `Loglikelihoods`: for each (context ids, continuation ids) the summed log-probability of
the continuation tokens and whether every one of them is the argmax (lm-eval's is_greedy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Loglikelihoods = Callable[[Sequence[tuple[list[int], list[int]]]], list[tuple[float, bool]]]


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's HFLM.prefix_token_id: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token: an empty context has no prefix token")
    return tokenizer.eos_token_id


def tok_encode(tokenizer: Any, text: str) -> list[int]:
    """HFLM.tok_encode: the tokenizer's default special tokens, none if text already starts with the prefix token."""
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_request(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, as lm-eval's HF backend encodes it."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if not cont:
            raise ValueError("a request with an empty context and an empty continuation has nothing to score")
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def model_input(context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int) -> list[int]:
    """The ids the model reads for one request; its last len(continuation_ids) positions predict them.

    lm-eval cuts a request longer than max_length + 1 from the left (and warns); evaluate_benchmarks counts
    such requests as truncated in its output."""
    if not context_ids or not continuation_ids:
        raise ValueError("a request needs at least one context and one continuation token")
    if len(continuation_ids) > max_length:
        raise ValueError(f"continuation of {len(continuation_ids)} tokens exceeds the model's context {max_length}")
    return (list(context_ids) + list(continuation_ids))[-(max_length + 1) :][:-1]


def is_truncated(context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int) -> bool:
    return len(context_ids) + len(continuation_ids) > max_length + 1
