"""Versioned prompt templates, rendered with the generator's chat template into token ids.

Two tasks (paper-notes.md, "Generation"):
- rephrase: G samples of one prompt per document (the default template is the WRAP Wikipedia-style
  rephrase the megadocs paper used; WRAP's other styles are here too);
- rationale: the document is cut into G+1 chunks by generator tokens, and for each split point one
  latent-thought rationale is asked for from (prefix, suffix) (Ruan et al. 2025, "Reasoning to learn
  from latent thoughts").

In every template the document comes first and the per-style instruction after it, and all rephrase
templates share one system message: the rendered prompts of one document under different styles then
share the document as a token prefix, which vLLM's prefix cache reuses. (The paper's prompt put the
instruction before the document; the instructions here are worded for the document-first order.)

Versioning: a template is identified by (name, version) and its fingerprint (sha256 of its texts) is
stored in each job's provenance. Changing a template's text means a new version number;
tests/test_prompts.py pins the fingerprints so that an edit without a version bump fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generation.backends import Request

TASKS = ("rephrase", "rationale")
DEFAULT_TEMPLATE = {"rephrase": "wikipedia", "rationale": "latent-thoughts"}

# Shared by every rephrase template, so that the system turn is part of the shared prefix too.
REPHRASE_SYSTEM = (
    "You are a careful writer. Reply with the requested text only: no preamble, no notes, no comments about the task."
)
DOCUMENT_OPENING = "Here is a document.\n\n<document>\n"
DOCUMENT_CLOSING = "\n</document>\n\n"
RATIONALE_LAYOUT = (
    "Here is a document cut in two.\n\n<prefix>\n{prefix}\n</prefix>\n\n<suffix>\n{suffix}\n</suffix>\n\n"
)


class PromptError(ValueError):
    """A template or tokenizer problem; the message names the template or the tokenizer directory."""


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    task: str  # one of TASKS
    system: str
    instruction: str  # placed after the document (or after the prefix and suffix)
    description: str = ""

    @property
    def fingerprint(self) -> str:
        texts = {"task": self.task, "system": self.system, "instruction": self.instruction}
        if self.task == "rephrase":
            texts["document"] = DOCUMENT_OPENING + "{document}" + DOCUMENT_CLOSING
        else:
            texts["split"] = RATIONALE_LAYOUT
        return "sha256:" + hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "task": self.task, "fingerprint": self.fingerprint}

    def messages(self, document: str = "", prefix: str = "", suffix: str = "") -> list[dict[str, str]]:
        """Chat messages: the system turn, then one user turn with the text first, the instruction last."""
        if self.task == "rephrase":
            body = DOCUMENT_OPENING + document + DOCUMENT_CLOSING
        else:
            body = RATIONALE_LAYOUT.format(prefix=prefix, suffix=suffix)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": body + self.instruction}]


_WRAP = "For the document above, give me a paraphrase of the same "

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "wikipedia",
            1,
            "rephrase",
            REPHRASE_SYSTEM,
            "Rewrite the document above, whatever its format, as a complete, high-quality article in English "
            "with the same content, in the style of Wikipedia. Begin the article now.",
            "WRAP's Wikipedia style as the megadocs paper used it (default)",
        ),
        PromptTemplate(
            "wrap-easy",
            1,
            "rephrase",
            REPHRASE_SYSTEM,
            _WRAP + "using a very small vocabulary and extremely simple sentences that a toddler will understand.",
            "WRAP 'easy' style",
        ),
        PromptTemplate(
            "wrap-medium",
            1,
            "rephrase",
            REPHRASE_SYSTEM,
            "For the document above, give me a diverse paraphrase of the same in high quality English language "
            "as in sentences on Wikipedia.",
            "WRAP 'medium' style, WRAP's own wording of the Wikipedia style",
        ),
        PromptTemplate(
            "wrap-hard",
            1,
            "rephrase",
            REPHRASE_SYSTEM,
            _WRAP + "using very terse and abstruse language that only an erudite scholar will understand. Replace "
            "simple words and phrases with rare and complex ones.",
            "WRAP 'hard' style",
        ),
        PromptTemplate(
            "wrap-qa",
            1,
            "rephrase",
            REPHRASE_SYSTEM,
            'Convert the document above into a conversational format with multiple tags of "Question:" followed '
            'by "Answer:".',
            "WRAP question-answer style",
        ),
        PromptTemplate(
            "latent-thoughts",
            1,
            "rationale",
            "You write the hidden reasoning behind texts. Reply with that reasoning only.",
            "The suffix continues the prefix. Write the latent thoughts that lead from the prefix to the suffix: "
            "the background knowledge the suffix takes for granted and the reasoning behind each of its claims, "
            "step by step, in concise declarative sentences. Use plain text without markdown, and never mention "
            "the words prefix or suffix.",
            "rationales for stretching (Ruan et al. 2025)",
        ),
    )
}


def get_template(name: str, task: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise PromptError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    template = TEMPLATES[name]
    if template.task != task:
        raise PromptError(f"template {name!r} is for task {template.task!r}, not {task!r}")
    return template


# --------------------------------------------------------------------------------------------------
# Rendering with the generator's chat template
# --------------------------------------------------------------------------------------------------


def generator_tokenizer(
    model_dir: str | Path, *, chat_template: str | Path | None = None, trust_remote_code: bool = False
):
    """The generator's tokenizer (hf.load_tokenizer), which must have a chat template (its own or the file
    `chat_template`) and be a fast tokenizer."""
    from megadoc_jax import hf_tokenizer as hf

    try:
        tokenizer = hf.load_tokenizer(model_dir, chat_template=chat_template, trust_remote_code=trust_remote_code)
    except hf.HFError as e:
        raise PromptError(str(e)) from None
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"tokenizer in {model_dir} has no chat template; pass --chat-template FILE (a Jinja chat template)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(f"tokenizer in {model_dir} is not a fast tokenizer; character offsets are needed")
    return tokenizer


def render(tokenizer: Any, template: PromptTemplate, **texts: str) -> list[int]:
    """Token ids of the chat-rendered prompt, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(template.messages(**texts), tokenize=False, add_generation_prompt=True)
    # The chat template writes its special tokens (BOS, turn markers) itself: add none here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span (start, end) of each token of `text` (no special tokens)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(span) for span in encoded["offset_mapping"]]


def split_points(num_tokens: int, num_chunks: int) -> list[int]:
    """Token indices floor(i * n / chunks), i = 1..chunks-1: the same rule as megadocs.chunk_bounds, so
    that with one tokenizer for generation and training the stretched chunks meet the rationales."""
    if num_tokens < num_chunks:
        raise ValueError(f"{num_tokens} tokens cannot make {num_chunks} non-empty chunks")
    return [i * num_tokens // num_chunks for i in range(1, num_chunks)]


def rationale_splits(offsets: Sequence[tuple[int, int]], samples: int) -> list[tuple[int, int]]:
    """(split token, split character) for each of the `samples` split points of G+1 = samples+1 chunks."""
    return [(point, offsets[point][0]) for point in split_points(len(offsets), samples + 1)]


# --------------------------------------------------------------------------------------------------
# Requests of one document: prompts that fit the context, per-sample seeds
# --------------------------------------------------------------------------------------------------


def document_seed(seed: int, doc_id: str) -> int:
    """Seed of sample 0 of a document; sample k uses this + k (vLLM's rule for its n child requests)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:7], "big")


@dataclasses.dataclass
class DocumentRequests:
    text: str  # the part of the document the prompts hold: all of it unless cut to fit
    requests: list[Request]  # rephrase: one request of G samples; rationale: G requests of one sample
    splits: list[tuple[int, int]] | None  # rationale: (token, character) of each split point


class RequestBuilder:
    """Turns a document into requests whose prompts leave room for max_new_tokens in the context.

    A document whose prompt is too long is skipped ("overlong"), or with cut=True shortened at a token
    boundary until it fits; a rationale document with fewer tokens than G+1 chunks is "too_short".
    """

    def __init__(
        self,
        tokenizer: Any,
        template: PromptTemplate,
        samples: int,
        seed: int,
        *,
        context_length: int,
        max_new_tokens: int,
        cut: bool,
    ):
        self.tokenizer, self.template, self.samples, self.seed, self.cut = tokenizer, template, samples, seed, cut
        self.budget = context_length - max_new_tokens  # prompt tokens that leave room to finish
        if self.budget <= 0:
            raise PromptError(f"max_new_tokens={max_new_tokens} leaves no room in the context of {context_length}")

    def build(self, doc_id: str, text: str) -> DocumentRequests | str:
        """The document's requests, or why it is skipped: 'overlong' or 'too_short'."""
        for _ in range(4):  # cutting by the excess fits at once unless tokens merge across the cut
            built = self._requests(doc_id, text)
            if built is None:
                return "too_short"
            excess = max(len(r.prompt_token_ids) for r in built.requests) - self.budget
            if excess <= 0:
                return built
            offsets = token_offsets(self.tokenizer, text)
            keep = len(offsets) - excess
            if not self.cut or keep < 1:
                return "overlong"
            text = text[: offsets[keep][0]]
        return "overlong"

    def _requests(self, doc_id: str, text: str) -> DocumentRequests | None:
        seed, G = document_seed(self.seed, doc_id), self.samples
        if self.template.task == "rephrase":
            ids = render(self.tokenizer, self.template, document=text)
            return DocumentRequests(text, [Request(tuple(ids), tuple(range(seed, seed + G)))], None)
        offsets = token_offsets(self.tokenizer, text)
        if len(offsets) < G + 1:
            return None
        splits = rationale_splits(offsets, G)
        requests = [
            Request(tuple(render(self.tokenizer, self.template, prefix=text[:char], suffix=text[char:])), (seed + k,))
            for k, (_, char) in enumerate(splits)
        ]
        return DocumentRequests(text, requests, splits)
