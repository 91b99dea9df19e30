"""Prompt templates: versions pinned, chat rendering, shared document prefix, splits, request building.

Also home of `make_generator_dir`, the small tokenizer (with a chat template) that the generation tests
share: tests/test_generate.py and the backend tests import it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation import prompts as P
from megadoc_jax.data.demo import train_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    f"Document {i} explains how {fruit} grow in {place}, and why the {colour} ones taste better."
    for i, (fruit, place, colour) in enumerate(
        [("apples", "orchards", "red"), ("pears", "gardens", "green"), ("plums", "valleys", "blue")] * 40
    )
]


def make_generator_dir(path: Path, *, chat_template: bool = True, context_length: int = 512) -> Path:
    """A generator directory without weights: a byte-level BPE tokenizer (+ chat template), config.json."""
    train_tokenizer(CORPUS, path, vocab_size=400)
    if chat_template:
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = CHAT_TEMPLATE
        config_path.write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": context_length}))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return P.generator_tokenizer(make_generator_dir(tmp_path_factory.mktemp("generator")))


# Editing a template's texts without bumping its version must fail here: outputs made with
# (name, version) must mean one prompt forever.
PINNED = {
    ("wikipedia", 1): "sha256:475929ce7d81fbb3768d252982c67c24c1de046764a63ebe16dc9e5b9502d081",
    ("wrap-easy", 1): "sha256:b49a1e798d399262121aca62153abe8f10f17c83be7270da80f359a3dc01f9a0",
    ("wrap-medium", 1): "sha256:52bdea9e56569cbaf532b155d16b47753799c1368ab5a0ec1ff4ee9be9ce7096",
    ("wrap-hard", 1): "sha256:f53c3f05559f770a36be042a4e7d69c849ae3c363d14f80d757116d4ea03e228",
    ("wrap-qa", 1): "sha256:ce7b005a63151c47b373eeffea9dc38476fba0bdccd9d71936f74f381ec47ca7",
    ("latent-thoughts", 1): "sha256:fb63b1a0dfb9967514ae4d237eaf7173ffaf921909ec4799e2acde2a42e879da",
}


def test_template_fingerprints_are_pinned_to_versions():
    assert {(t.name, t.version) for t in P.TEMPLATES.values()} == set(PINNED)  # a new template is pinned too
    for (name, version), fingerprint in PINNED.items():
        template = P.TEMPLATES[name]
        assert template.version == version and template.fingerprint == fingerprint, name
    fingerprints = [t.fingerprint for t in P.TEMPLATES.values()]
    assert len(set(fingerprints)) == len(fingerprints)
    assert {P.DEFAULT_TEMPLATE[task] for task in P.TASKS} <= set(P.TEMPLATES)


def test_get_template_names_the_problem():
    with pytest.raises(P.PromptError, match="unknown template 'nope'.*wikipedia"):
        P.get_template("nope", "rephrase")
    with pytest.raises(P.PromptError, match="for task 'rationale', not 'rephrase'"):
        P.get_template("latent-thoughts", "rephrase")


def test_document_comes_before_the_instruction(tokenizer):
    document = "Apples grow in orchards."
    for template in P.TEMPLATES.values():
        split = {"prefix": "Apples grow", "suffix": " in orchards."}
        texts = {"document": document} if template.task == "rephrase" else split
        text = tokenizer.decode(P.render(tokenizer, template, **texts))
        assert text.startswith("<|system|>\n" + template.system)
        assert text.index("Apples grow") < text.index(template.instruction) < text.index("<|assistant|>")
        assert text.endswith("<|assistant|>\n")


def test_two_styles_share_the_document_as_a_token_prefix(tokenizer):
    """What vLLM's prefix cache reuses: every token up to the end of the document is the same."""
    document = CORPUS[5] + " " + CORPUS[7]
    wikipedia = P.render(tokenizer, P.TEMPLATES["wikipedia"], document=document)
    qa = P.render(tokenizer, P.TEMPLATES["wrap-qa"], document=document)
    shared = next(i for i, (a, b) in enumerate(zip(wikipedia, qa)) if a != b)
    assert document + P.DOCUMENT_CLOSING.rstrip() in tokenizer.decode(wikipedia[:shared])


def test_rationale_prompts_of_one_document_share_its_prefix(tokenizer):
    text = CORPUS[3] + " " + CORPUS[4]
    offsets = P.token_offsets(tokenizer, text)
    (_, first), (_, second) = P.rationale_splits(offsets, 2)
    template = P.TEMPLATES["latent-thoughts"]
    a = P.render(tokenizer, template, prefix=text[:first], suffix=text[first:])
    b = P.render(tokenizer, template, prefix=text[:second], suffix=text[second:])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert text[: first - 1] in tokenizer.decode(a[:shared])


def test_split_points_follow_megadocs_chunk_rule():
    assert P.split_points(10, 3) == [3, 6]  # floor(i * 10 / 3)
    assert P.split_points(4, 4) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 tokens cannot make 4"):
        P.split_points(3, 4)


def test_rationale_splits_cut_at_token_starts(tokenizer):
    text = CORPUS[0] + " " + CORPUS[1]
    offsets = P.token_offsets(tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token, char in P.rationale_splits(offsets, 3):
        assert tokenizer.decode(ids[:token]) == text[:char]


def test_generator_tokenizer_needs_a_chat_template(tmp_path):
    directory = make_generator_dir(tmp_path / "plain", chat_template=False)
    with pytest.raises(P.PromptError, match=f"{directory}.*--chat-template"):
        P.generator_tokenizer(directory)
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(CHAT_TEMPLATE)
    assert P.generator_tokenizer(directory, chat_template=template_file).chat_template == CHAT_TEMPLATE


def builder(tokenizer, task="rephrase", samples=3, context=2048, max_new=64, cut=False):
    template = P.get_template(P.DEFAULT_TEMPLATE[task], task)
    return P.RequestBuilder(
        tokenizer, template, samples, seed=7, context_length=context, max_new_tokens=max_new, cut=cut
    )


def test_rephrase_request_has_consecutive_per_document_seeds(tokenizer):
    built = builder(tokenizer).build("doc-a", CORPUS[0])
    (request,) = built.requests
    base = P.document_seed(7, "doc-a")
    assert request.seeds == (base, base + 1, base + 2) and built.splits is None
    assert builder(tokenizer).build("doc-a", CORPUS[0]).requests == built.requests  # deterministic
    assert builder(tokenizer).build("doc-b", CORPUS[0]).requests[0].seeds[0] != base


def test_rationale_requests_one_per_split_point(tokenizer):
    built = builder(tokenizer, task="rationale", samples=3).build("doc-a", CORPUS[2])
    base = P.document_seed(7, "doc-a")
    assert [r.seeds for r in built.requests] == [(base,), (base + 1,), (base + 2,)]
    assert [char for _, char in built.splits] == sorted({char for _, char in built.splits})
    assert builder(tokenizer, task="rationale", samples=40).build("short", "Tiny text.") == "too_short"


def test_overlong_documents_are_skipped_or_cut_to_fit(tokenizer):
    long_text = " ".join(CORPUS[:60])
    context, max_new = 1024, 64  # the templates alone take 250-420 tokens of this small vocabulary
    assert builder(tokenizer, context=context, max_new=max_new).build("long", long_text) == "overlong"
    for task in P.TASKS:
        built = builder(tokenizer, task=task, context=context, max_new=max_new, cut=True).build("long", long_text)
        assert long_text.startswith(built.text) and 0 < len(built.text) < len(long_text)
        longest = max(len(r.prompt_token_ids) for r in built.requests)
        assert longest <= context - max_new
        assert longest > context - max_new - 10  # cut by the excess, not by a crude margin
    short = builder(tokenizer, context=context, max_new=max_new, cut=True).build("short", CORPUS[0])
    assert short.text == CORPUS[0]
