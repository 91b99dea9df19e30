"""Evaluation of checkpoints.

- benchmark_tasks.py: the multiple-choice benchmarks (ARC-Easy, ARC-Challenge, PIQA, SciQ, HellaSwag,
  Winogrande) as lm-evaluation-harness 0.4.x defines them, read from local JSONL/Parquet files; few-shot
  contexts with lm-eval's sampler.
- loglikelihood_requests.py: the token ids of a (context, continuation) request as lm-eval's HF backend
  encodes them, and the window a model reads.
- benchmarks.py: `evaluate_benchmarks`, acc / acc_norm with standard errors per task and the paper's
  three-task average, identical to lm-eval given the same log-likelihoods.
"""
