"""lm-evaluation-harness's HF backend timed on log-likelihood requests: the other side of multiple_choice.py.

Runs in lm-eval's own virtualenv (it imports lm_eval, torch and transformers, never megadoc_jax):

    LM_EVAL_PYTHON megadoc_jax/benchmarks/lm_eval_hf.py REQUESTS.json MODEL_DIR BATCH_SIZE THREADS

REQUESTS.json is a list of [context, continuation] strings. HFLM (fp32, CPU, batch BATCH_SIZE, THREADS torch
threads, 0 = torch's default) answers them once as a warm-up and prints one JSON line (warm-up seconds,
versions, the answers [[loglikelihood, is_greedy], ...]); then, for every line "pass" read from stdin,
answers them again and prints {"seconds": ...}, so that the caller can interleave its own passes with these.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(requests_json: str, model_dir: str, batch_size: str, threads: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    with open(requests_json, encoding="utf-8") as f:
        pairs = json.load(f)
    instances = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(pairs)]
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=int(batch_size))

    def answer() -> tuple[list, float]:
        start = time.perf_counter()
        answers = lm.loglikelihood(instances, disable_tqdm=True)
        return answers, time.perf_counter() - start

    answers, warmup = answer()
    ready = {
        "warmup_seconds": warmup,
        "answers": [[float(ll), bool(greedy)] for ll, greedy in answers],
        "versions": {
            "lm_eval": getattr(lm_eval, "__version__", "?"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() == "pass":
            print(json.dumps({"seconds": answer()[1]}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
