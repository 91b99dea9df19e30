"""Evaluation: held-out losses of checkpoints and ensembles, and per-token scores that finer evaluations build on.

- batches.py: `eval_batches`, the first windows of an eval store, as this process's rows.
- token_scores.py: `token_scores` / `jit_token_scores` (and `ensemble_token_scores` /
  `jit_ensemble_token_scores`), the log-probability (and greedy hit) of every target token, in the original
  token order whatever the attention layout.
- loss_windows.py: the two window recipes of held-out losses (concat, the paper's; document).
- token_bytes.py: bytes of text per token id, for bits per byte.
- losses.py: `RowScorer`, `LossSums`, `score_batches`: per-token scores to figures (loss, bpb, by position,
  by segment), summed in float64 on the host.
- models.py: the checkpoints evaluated (runs or Hugging Face Llama directories), one or an ensemble.
- report.py: the JSON record, metric names and console summary of `python -m megadoc_jax.evaluate`.
- heldout.py: `HeldOutLoss`, the training loop's periodic evaluation, {"eval/<name>/loss": ...}, through
  losses.py.
- benchmark_tasks.py, loglikelihood_requests.py, benchmarks.py: lm-eval-identical multiple choice.
"""

from megadoc_jax.evaluation.batches import eval_batches
from megadoc_jax.evaluation.heldout import HeldOutLoss
from megadoc_jax.evaluation.token_scores import (
    ensemble_token_scores,
    jit_ensemble_token_scores,
    jit_token_scores,
    token_scores,
)

__all__ = [
    "HeldOutLoss",
    "ensemble_token_scores",
    "eval_batches",
    "jit_ensemble_token_scores",
    "jit_token_scores",
    "token_scores",
]
