"""Argument checks shared by the schedulers: each names the scheduler, the key, what is allowed and
what was given."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Validation helpers: one message shape for every bad config value


def check_choice(owner: str, key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{owner}: `{key}` must be one of {choices}; got {value!r}")


def check_positive_int(owner: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{owner}: `{key}` must be a positive int; got {value!r}")


def check_num_inference_steps(owner: str, num_inference_steps: Any, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(
            f"{owner}.set_timesteps: `num_inference_steps` must be a positive int; got {num_inference_steps!r}"
        )
    if num_inference_steps < 1:
        raise ValueError(f"{owner}.set_timesteps: `num_inference_steps` must be >= 1; got {num_inference_steps}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"{owner}.set_timesteps: `num_inference_steps` ({num_inference_steps}) cannot be larger than "
            f"`num_train_timesteps` ({num_train_timesteps}): the model was trained on {num_train_timesteps} "
            "timesteps only"
        )
    return int(num_inference_steps)


def check_descending(owner: str, timesteps: Sequence, num_train_timesteps: int) -> None:
    """Custom timesteps must be strictly decreasing and start below ``num_train_timesteps``."""
    values = [float(t) for t in timesteps]
    if not values:
        raise ValueError(f"{owner}.set_timesteps: `timesteps` is empty")
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            raise ValueError(
                f"{owner}.set_timesteps: custom `timesteps` must be in strictly descending order; "
                f"position {i} has {values[i]} after {values[i - 1]}"
            )
    if values[0] >= num_train_timesteps:
        raise ValueError(
            f"{owner}.set_timesteps: custom `timesteps` must start below num_train_timesteps "
            f"({num_train_timesteps}); got {values[0]}"
        )
