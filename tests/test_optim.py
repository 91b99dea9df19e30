"""make_optimizer: schedule values, decay mask from paths, AdamW with PyTorch semantics, clipping."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from megadoc_jax.config import ModelConfig, OptimConfig
from megadoc_jax.model import Decoder
from megadoc_jax.optim import decay_mask, lr_schedule, make_optimizer, path_name


def test_schedule_values_against_hand_computation():
    cfg = OptimConfig(lr=1e-3, warmup_fraction=0.1, final_lr_fraction=0.1)
    schedule = lr_schedule(cfg, total_steps=100)  # 10 warmup steps, 90 cosine steps
    floor = 1e-4
    cosine = lambda s: floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))
    expected = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 11: cosine(11), 55: cosine(55), 99: cosine(99)}
    expected.update({100: floor, 500: floor})
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(float(schedule(55)), (1e-3 + floor) / 2, rtol=1e-5)  # half way down
    no_warmup = lr_schedule(dataclasses.replace(cfg, warmup_fraction=0.0, final_lr_fraction=0.0), 50)
    values = [float(no_warmup(step)) for step in (0, 25, 50)]
    np.testing.assert_allclose(values, [1e-3, 5e-4, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="total_steps"):
        lr_schedule(cfg, 0)


def test_decay_mask_excludes_norms_and_embedding_but_not_the_output_projection():
    model = nnx.eval_shape(lambda: Decoder(ModelConfig(), rngs=nnx.Rngs(0)))
    for params in (nnx.state(model, nnx.Param), nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        mask = decay_mask(params, OptimConfig().no_decay)
        flat = {path_name(path): bool(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]}
        excluded = sorted(name for name, decayed in flat.items() if not decayed)
        assert excluded == ["embed", "final_norm/scale", "layers/attn_norm/scale", "layers/mlp_norm/scale"]
        assert flat["lm_head"] and flat["layers/attention/wq"] and flat["layers/mlp/w_down"]
    custom = decay_mask(nnx.state(model, nnx.Param), ("^lm_head$", r"attention/w[qk]"))
    flat = {path_name(p): bool(v) for p, v in jax.tree_util.tree_flatten_with_path(custom)[0]}
    assert not flat["lm_head"] and not flat["layers/attention/wk"] and flat["layers/attention/wv"] and flat["embed"]


def test_bad_pattern_names_the_config_field():
    with pytest.raises(ValueError, match=r"optim.no_decay\[1\]"):
        make_optimizer(OptimConfig(no_decay=("norm", "([")), total_steps=10)


def _torch_adamw_reference(params, grads_per_step, cfg: OptimConfig, lrs, decayed):
    """torch.optim.AdamW's algorithm written out in float64, with global-norm clipping first."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, cfg.clip_norm / norm) if cfg.clip_norm > 0 else 1.0
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            if decayed[k]:
                params[k] = params[k] * (1 - lr * cfg.weight_decay)  # torch: p.mul_(1 - lr * wd)
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g * g
            m_hat, v_hat = m[k] / (1 - cfg.b1**t), v[k] / (1 - cfg.b2**t)
            params[k] = params[k] - lr * m_hat / (np.sqrt(v_hat) + cfg.eps)
    return params


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_adamw_matches_pytorch_semantics(clip_norm):
    cfg = OptimConfig(lr=0.05, weight_decay=1.6, warmup_fraction=0.25, final_lr_fraction=0.0, clip_norm=clip_norm)
    total_steps = 4
    rng = np.random.default_rng(0)
    shapes = {"embed": (5, 3), "lm_head": (3, 5), "final_norm": (3,), "w_up": (3, 4)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    # Gradient norms around 0.3, 3 and 30: the clip matters on some steps, not others.
    grads_per_step = [
        {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in shapes.items()}
        for scale in (0.1, 1.0, 10.0)
    ]

    tx, schedule = make_optimizer(cfg, total_steps)
    state, current = tx.init(params), params
    update = jax.jit(tx.update)
    for grads in grads_per_step:
        updates, state = update(grads, state, current)
        current = optax.apply_updates(current, updates)

    lrs = [float(schedule(s)) for s in range(len(grads_per_step))]
    np.testing.assert_allclose(lrs, [0.05, 0.05, 0.05 * 0.5 * (1 + math.cos(math.pi / 3))], rtol=1e-6)
    decayed = {"embed": False, "lm_head": True, "final_norm": False, "w_up": True}
    expected = _torch_adamw_reference(params, grads_per_step, cfg, lrs, decayed)
    for k in params:
        np.testing.assert_allclose(current[k], expected[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_zero_gradient_step_only_shrinks_decayed_weights():
    cfg = OptimConfig(lr=0.01, weight_decay=0.8, warmup_fraction=0.0)
    params = {"embed": jnp.ones((2, 2)), "attn_norm": jnp.ones(2), "lm_head": jnp.ones((2, 2))}
    tx, _ = make_optimizer(cfg, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["lm_head"], 1 - 0.01 * 0.8, rtol=1e-6)  # w -= lr * wd * w
    np.testing.assert_array_equal(new["embed"], params["embed"])
    np.testing.assert_array_equal(new["attn_norm"], params["attn_norm"])
