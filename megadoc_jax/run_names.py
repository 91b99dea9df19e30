"""Run names that encode a run's hyper-parameters, short enough for every filesystem and logger.

    run_name(config)  ->  "300m-dclm-stitched-back-g32-e32-r0.9-lr1e-3-wd0.4-s0"
                          "300m-dclm-real-e16-lr3e-3-wd1.6-s0"
                          "300m-dclm-stitched-back-g32-ctx32k-e32-r0.9-lr1e-3-wd0.4-s0"   (32768-token windows)

Parts, in order: model size (a custom shape: d<hidden>l<layers>), experiment.data, experiment.method with
G, the context length data.seq_len where it is not the paper's 4096 (ctx32k; ctx<n> when n is not a
multiple of 1024), real epochs E, the synthetic stream's weight r (left out without one), lr, weight decay, train.seed.
A part that the config does not state is left out. Only [A-Za-z0-9.-] appear, so a name is a valid
directory, TensorBoard run and W&B name; the name is a label for people: sweeps and reports read a
run's resolved config (config.experiment and the rest), never parse names. No JAX import.
"""

from __future__ import annotations

from megadoc_jax.config import CUSTOM_SIZE, Config

MAX_LENGTH = 96  # well under every filesystem's 255 and loggers' limits
PAPER_SEQ_LEN = 4096  # the paper's context length: left out of names


def number(x: float) -> str:
    """Short and exact enough for a grid value: 3e-3, 1e-3, 0.4, 1.6, 16, 0.75, 2.5e-4."""
    if x != 0 and abs(x) < 0.01:
        mantissa, exponent = f"{x:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.4g}"


def run_name(config: Config) -> str:
    m, d, o, e = config.model, config.data, config.optim, config.experiment
    size = f"d{m.hidden}l{m.layers}" if m.size == CUSTOM_SIZE else m.size
    parts = [size]
    if e.data:
        parts.append(e.data)
    if e.method:
        parts.append(e.method if e.method == "real" else f"{e.method}-g{e.generations}")
    if d.seq_len != PAPER_SEQ_LEN:
        parts.append(f"ctx{d.seq_len // 1024}k" if d.seq_len % 1024 == 0 else f"ctx{d.seq_len}")
    parts.append(f"e{number(d.real_epochs)}")
    weights = {s.name: s.weight for s in d.streams}
    if e.synthetic_stream in weights:
        parts.append(f"r{number(weights[e.synthetic_stream])}")
    parts += [f"lr{number(o.lr)}", f"wd{number(o.weight_decay)}", f"s{config.train.seed}"]
    name = "-".join(parts)
    if len(name) > MAX_LENGTH:  # not reachable with validated parts; a guard for future ones
        raise ValueError(f"run name {name!r} is longer than {MAX_LENGTH} characters")
    return name
