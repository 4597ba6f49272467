"""Training: state, compiled steps, schedules, checkpoints, metrics and the loop.
`python -m cnn_jax.train --help` trains any registry model on any dataset source."""
from cnn_jax.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg, command=None, on_steps=None):
    """See `cnn_jax.train.loop.train` (imported lazily: it pulls in jax and grain)."""
    from cnn_jax.train.loop import train as _train
    return _train(cfg, command, on_steps)
