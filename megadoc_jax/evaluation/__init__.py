"""Evaluation: held-out losses of a run and per-token scores that finer evaluations build on.

- batches.py: `eval_batches`, the first windows of an eval store, as this process's rows.
- token_scores.py: `token_scores` / `jit_token_scores`, the log-probability (and greedy hit) of every
  target token, in the original token order whatever the attention layout.
- heldout.py: `HeldOutLoss`, the mean next-token loss on the run's named eval stores,
  {"eval/<name>/loss": ...}.

The training loop's periodic and final evaluations are a `HeldOutLoss`.
"""

from megadoc_jax.evaluation.batches import eval_batches
from megadoc_jax.evaluation.heldout import HeldOutLoss
from megadoc_jax.evaluation.token_scores import jit_token_scores, token_scores

__all__ = ["HeldOutLoss", "eval_batches", "jit_token_scores", "token_scores"]
