"""Write the lm-evaluation-harness fixture that tests/test_benchmarks.py checks megadoc_jax against.

Runs in its OWN virtualenv (lm-eval is never installed in the project's environment nor in CI):

    python3 -m venv /work/lmeval-venv
    /work/lmeval-venv/bin/pip install torch==2.13.0
    /work/lmeval-venv/bin/pip install lm_eval==0.4.13 transformers
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /work/lmeval-venv/bin/python tests/make_lm_eval_fixture.py

(from the repository root; CPU only, under a minute; nothing is downloaded). It

1. trains a byte-level BPE tokenizer on the item files' text with `tokenizers`; like Llama's, its
   post-processor puts BOS in front of every encoding;
2. builds a tiny randomly initialised LlamaForCausalLM (seed 0, fp32, hidden 64, 2 layers, 4 heads,
   2 kv heads, random RMSNorm weights, weights large enough that choices differ by far more than
   1e-3 in log-likelihood) and saves it with the tokenizer in tests/data/lm_eval_model/ (safetensors);
3. writes tests/data/benchmarks_parquet/piqa/*.parquet from the PIQA JSONL files, so that lm-eval reads
   one task from Parquet (and tests check that our Parquet reader sees the same items);
4. runs lm-eval's HF backend (`simple_evaluate(model="hf", ...)`, batch size 1) with the built-in task
   definitions arc_easy, arc_challenge, piqa, sciq, hellaswag, winogrande pointed at the local files
   (lm-eval's own way: a group whose members name a registered task with overrides of dataset_path,
   dataset_name and dataset_kwargs), zero-shot, and again 2-shot on arc_easy, piqa, hellaswag and
   winogrande (fewshot seed 1234, lm-eval's default); the zero-shot group `paper3` averages acc and
   acc_norm over arc_easy, piqa and sciq unweighted, as the paper's figure does;
5. writes tests/data/lm_eval_fixture.json: per task and item the requests (context and continuation
   strings, the token ids lm-eval's HFLM fed the model, log-likelihood, is_greedy), the item's metrics,
   and per task the aggregates with standard errors; plus the versions used.

The token ids are recorded by wrapping HFLM._loglikelihood_tokens, which receives lm-eval's encodings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data" / "benchmarks"
PARQUET = ROOT / "data" / "benchmarks_parquet"
MODEL_DIR = ROOT / "data" / "lm_eval_model"
FIXTURE = ROOT / "data" / "lm_eval_fixture.json"

# task -> (scored split, few-shot split); the splits lm-eval's task definitions use.
SPLITS = {
    "arc_easy": ("test", "train"),
    "arc_challenge": ("test", "train"),
    "piqa": ("validation", "train"),
    "sciq": ("test", "train"),
    "hellaswag": ("validation", "train"),
    "winogrande": ("validation", "train"),
}
PARQUET_TASKS = ("piqa",)
PAPER_TASKS = ("arc_easy", "piqa", "sciq")
FEWSHOT_TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")
NUM_FEWSHOT = 2
FEWSHOT_SEED = 1234
MAX_POSITIONS = 192  # one SciQ item is longer: lm-eval truncates it from the left
VOCAB_SIZE = 512
BOS, EOS = "<s>", "</s>"


def item_texts() -> list[str]:
    """Every string in every item file (the tokenizer's training text)."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    texts = []
    for path in sorted(DATA.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.extend(strings(json.loads(line)))
    return texts


def build_tokenizer():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(item_texts(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: a wrong norm convention shows
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.25)  # large logits: choices far apart in log-likelihood
    return model


def write_parquet() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for task in PARQUET_TASKS:
        for split in SPLITS[task]:
            rows = [json.loads(x) for x in (DATA / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
            out = PARQUET / task / f"{split}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), out)


def task_spec(task: str) -> dict:
    """A reference to lm-eval's registered task with our local files as its data set."""
    scored, fewshot = SPLITS[task]
    if task in PARQUET_TASKS:
        builder, files = "parquet", {s: str(PARQUET / task / f"{s}.parquet") for s in (scored, fewshot)}
    else:
        builder, files = "json", {s: str(DATA / task / f"{s}.jsonl") for s in (scored, fewshot)}
    return {"task": task, "dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": files}}


class Recorder:
    """Wraps HFLM._loglikelihood_tokens: (context, continuation) -> (context ids, continuation ids)."""

    def __init__(self):
        self.encodings: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def install(self):
        from lm_eval.models.huggingface import HFLM

        original = HFLM._loglikelihood_tokens
        encodings = self.encodings

        def recording(lm, requests, *args, **kwargs):
            for strings, ctx, cont in requests:
                seen = encodings.setdefault(tuple(strings), (list(ctx), list(cont)))
                assert seen == (list(ctx), list(cont)), strings
            return original(lm, requests, *args, **kwargs)

        HFLM._loglikelihood_tokens = recording


def evaluate(group: dict, num_fewshot: int) -> dict:
    """Run one group, written as a YAML file in a temporary include_path (lm-eval's way for custom groups)."""
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{group['group']}.yaml").write_text(json.dumps(group))  # JSON is YAML
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={MODEL_DIR},dtype=float32",
            tasks=[group["group"]],
            num_fewshot=num_fewshot,
            batch_size=1,
            device="cpu",
            log_samples=True,
            fewshot_random_seed=FEWSHOT_SEED,
            task_manager=TaskManager(include_path=tmp),
        )


def task_record(results: dict, task: str, encodings: dict) -> dict:
    metrics = results["results"][task]
    names = [m for m in ("acc", "acc_norm") if f"{m},none" in metrics]
    items = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        requests = []
        for args, resp in zip(sample["arguments"], sample["resps"], strict=True):
            context, continuation = args
            ll, greedy = resp[0]
            ctx_ids, cont_ids = encodings[(context, continuation)]
            requests.append(
                {
                    "context": context,
                    "continuation": continuation,
                    "context_ids": ctx_ids,
                    "continuation_ids": cont_ids,
                    "loglikelihood": float(ll),
                    "is_greedy": bool(greedy),
                }
            )
        items.append({"doc_id": sample["doc_id"], "requests": requests, **{m: float(sample[m]) for m in names}})
    return {
        "n": len(items),
        "metrics": {m: metrics[f"{m},none"] for m in names},
        "stderr": {m: metrics[f"{m}_stderr,none"] for m in names},
        "items": items,
    }


def normalised_arguments(results: dict) -> None:
    """samples' arguments are {gen_args_i: {arg_0, arg_1}} or tuples depending on version: make tuples."""
    for samples in results["samples"].values():
        for s in samples:
            args = s["arguments"]
            if isinstance(args, dict):
                args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))]
            s["arguments"] = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else tuple(a) for a in args]


def dumps(value, depth: int = 0) -> str:
    """JSON indented down to the items; each item (its requests and token ids) on one line."""
    if depth >= 4 or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, ensure_ascii=False)
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict):
        body = ",\n".join(f"{inner}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in value.items())
        return "{\n" + body + "\n" + pad + "}"
    return "[\n" + ",\n".join(inner + dumps(v, depth + 1) for v in value) + "\n" + pad + "]"


def main() -> None:
    import datasets
    import lm_eval
    import tokenizers
    import torch
    import transformers

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    write_parquet()

    recorder = Recorder()
    recorder.install()
    paper = {
        "group": "paper3",
        "task": [task_spec(t) for t in PAPER_TASKS],
        "aggregate_metric_list": [
            {"metric": "acc", "aggregation": "mean", "weight_by_size": False},
            {"metric": "acc_norm", "aggregation": "mean", "weight_by_size": False},
        ],
    }
    others = {"group": "other3", "task": [task_spec(t) for t in SPLITS if t not in PAPER_TASKS]}
    zero = evaluate(paper, num_fewshot=0)
    zero_others = evaluate(others, num_fewshot=0)
    for key in ("results", "samples"):
        zero[key].update(zero_others[key])
    normalised_arguments(zero)
    few = evaluate({"group": "fewshot", "task": [task_spec(t) for t in FEWSHOT_TASKS]}, num_fewshot=NUM_FEWSHOT)
    normalised_arguments(few)

    group = zero["results"]["paper3"]
    fixture = {
        "about": "written by tests/make_lm_eval_fixture.py with lm-evaluation-harness's HF backend on CPU",
        "versions": {
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.13",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
        "model_dir": str(MODEL_DIR.relative_to(ROOT.parent)),
        "max_length": MAX_POSITIONS,
        "splits": {t: {"scored": s, "fewshot": f} for t, (s, f) in SPLITS.items()},
        "parquet_tasks": list(PARQUET_TASKS),
        "zero_shot": {t: task_record(zero, t, recorder.encodings) for t in SPLITS},
        "paper3": {
            "tasks": list(PAPER_TASKS),
            "metrics": {m: group[f"{m},none"] for m in ("acc", "acc_norm")},
            "stderr": {m: group[f"{m}_stderr,none"] for m in ("acc", "acc_norm")},
        },
        "few_shot": {
            "num_fewshot": NUM_FEWSHOT,
            "seed": FEWSHOT_SEED,
            "tasks": {t: task_record(few, t, recorder.encodings) for t in FEWSHOT_TASKS},
        },
    }
    FIXTURE.write_text(dumps(fixture) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes) and {MODEL_DIR}")


if __name__ == "__main__":
    main()
