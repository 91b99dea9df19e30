"""A config's Mixture: one Task per stream, rates equal to the Grain mixture's shares, and the proportions
seqio samples within a chi-square bound of them."""

import numpy as np
import pytest
import yaml

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")

import stores  # noqa: E402
from scipy import stats  # noqa: E402

from megadoc_jax import config as config_lib  # noqa: E402
from megadoc_jax.data import mixture  # noqa: E402
from megadoc_jax.seqio_interop import mixture_rates, register_config_mixture  # noqa: E402

WEIGHTS = {"real": 0.2, "synth": 0.3, "extra": 0.5}
SLICES = {"real": (120, 30), "synth": (150, 30), "extra": (180, 50)}  # demo corpus documents (skip, count)
DRAWS = 2000
ALPHA = 1e-3  # a fixed seed makes the draw deterministic; the bound is what a fair sampler passes 99.9% of


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, bang_tokenizer):
    root = tmp_path_factory.mktemp("mixture")
    streams = []
    for name, (skip, count) in SLICES.items():
        store = stores.write_store(root / name, bang_tokenizer, stores.corpus(count, skip=skip))
        streams.append({"name": name, "store": str(store), "weight": WEIGHTS[name]})
    data = {"tokenizer": str(bang_tokenizer), "streams": streams, "eval_stores": {"held-out": streams[0]["store"]}}
    raw = {"model": {"vocab_size": 1024}, "data": data}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_rates_are_the_grain_mixtures_block_shares():
    assert mixture_rates([0.2, 0.3, 0.5]) == [0.2, 0.3, 0.5]
    thirds = mixture_rates([1 / 3, 1 / 3, 1 / 3])
    assert thirds == (mixture.block_counts([1 / 3] * 3, mixture.BLOCK_SIZE) / mixture.BLOCK_SIZE).tolist()
    assert sorted(thirds) == [0.333, 0.333, 0.334] and sum(thirds) == pytest.approx(1.0)


def test_mixture_registers_a_task_per_stream(config_path):
    mix = register_config_mixture(config_path, "test_mix_tasks", replace=True)
    assert sorted(task.name for task in mix.tasks) == [
        "test_mix_tasks_extra",
        "test_mix_tasks_real",
        "test_mix_tasks_synth",
    ]
    assert {task.name: mix.get_rate(task) for task in mix.tasks} == {
        f"test_mix_tasks_{k}": w for k, w in WEIGHTS.items()
    }
    with pytest.raises(ValueError, match="duplicate provider"):
        register_config_mixture(config_path, "test_mix_tasks")
    held_out = seqio.get_mixture_or_task("test_mix_tasks_eval_held_out")
    assert held_out.splits == ("validation",) and held_out.source.num_input_examples("validation") == 30


def test_config_refusals_name_the_key(config_path, tmp_path):
    config = config_lib.load(config_path)
    with pytest.raises(config_lib.ConfigError, match="data.streams: is empty"):
        register_config_mixture(config_lib.load(config_path, ["data.streams=[]"]), "test_mix_empty")
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["tokenizer"] = ""
    (tmp_path / "no_tokenizer.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer: is empty; set it or pass tokenizer_dir"):
        register_config_mixture(tmp_path / "no_tokenizer.yaml", "test_mix_no_tokenizer")
    assert register_config_mixture(config, "test_mix_given", tokenizer_dir=config.data.tokenizer, replace=True).tasks


def test_sampled_proportions_match_the_weights(config_path):
    config = config_lib.load(config_path)
    mix = register_config_mixture(config, "test_mix_draws", replace=True)
    owner = {}
    for k in range(len(SLICES)):
        for document in stores.store_documents(config.data.streams[k].store):
            owner[(document["targets"] + 1).tobytes()] = k
    assert len(owner) == sum(count for _, count in SLICES.values())  # every document tells its stream
    dataset = mix.get_dataset(sequence_length=None, split="train", shuffle=True, seed=3, num_epochs=None)
    examples = list(dataset.take(DRAWS).as_numpy_iterator())
    assert set(examples[0]) == {"targets", "targets_segment_kind", "targets_segment_index"}  # kept by the Mixture
    counts = np.bincount([owner[e["targets"].tobytes()] for e in examples], minlength=3)
    expected = DRAWS * np.array(list(WEIGHTS.values()))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    bound = stats.chi2.ppf(1 - ALPHA, df=len(WEIGHTS) - 1)
    assert chi2 < bound, (counts.tolist(), expected.tolist(), chi2, bound)
    # each stream alone: a two-sided binomial bound at the same level
    z = stats.norm.ppf(1 - ALPHA / 2)
    p = expected / DRAWS
    assert (np.abs(counts - expected) <= z * np.sqrt(DRAWS * p * (1 - p))).all(), counts.tolist()
    # the test has power: equal weights would be refused by the same bound
    uniform = np.full(3, DRAWS / 3)
    assert float(((counts - uniform) ** 2 / uniform).sum()) > bound
