"""AdamW with PyTorch weight-decay semantics, a decay mask from parameter paths, and the LR schedule.

Update of one step t with learning rate lr_t (from the schedule), for gradient g:
    g      <- g * min(1, clip_norm / ||g||)            (global norm over all parameters; clip_norm 0: off)
    m, v   <- Adam moments of g (b1, b2), bias-corrected to m_hat, v_hat
    w      <- w - lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * w)     for decayed parameters
which is torch.optim.AdamW exactly: its `w *= 1 - lr_t * wd` before the Adam step is the same sum,
since the Adam direction does not depend on w. optax.adamw has this form (add_decayed_weights before
scale_by_learning_rate); tests/test_optim.py checks it against a hand computation.

The pre-clip gradient norm is not reported from here: the train step computes optax.tree.norm(grads)
on the same (accumulated, averaged) gradients that enter this transformation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from megadoc_jax.config import OptimConfig


def lr_schedule(optim_cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine decay to optim.final_lr_fraction * optim.lr.

    W = round(warmup_fraction * total_steps) warmup steps: step s < W gets lr * (s + 1) / W (never 0, so
    the first step already learns); step s >= W gets floor + (lr - floor) * (1 + cos(pi * p)) / 2 with
    p = (s - W) / (total_steps - W), clipped to [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"lr_schedule: total_steps must be positive, got {total_steps}")
    peak = optim_cfg.lr
    floor = optim_cfg.lr * optim_cfg.final_lr_fraction
    warmup = round(optim_cfg.warmup_fraction * total_steps)
    decay = max(total_steps - warmup, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def path_name(path: Sequence[Any]) -> str:
    """'layers/attention/wq' for a pytree key path (NNX's trailing '.value' attribute is dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def _compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"optim.no_decay[{i}]: {pattern!r} is not a regular expression: {e}") from None
    return compiled


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """Tree of bools like `params`: True where weight decay applies, False where any of the `no_decay`
    regular expressions is found (re.search) in the parameter's path name (see path_name)."""
    compiled = _compile_patterns(no_decay)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(path_name(path)) for p in compiled), params
    )


def make_optimizer(optim_cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, learning-rate schedule) as described in the module docstring."""
    schedule = lr_schedule(optim_cfg, total_steps)
    _compile_patterns(optim_cfg.no_decay)  # fail now, not at the first update
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: decay_mask(params, optim_cfg.no_decay),
    )
    if optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw), schedule
    return adamw, schedule
