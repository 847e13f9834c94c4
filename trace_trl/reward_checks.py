"""Reward functions checked at every call: a forgotten `return` fails naming the function, not deep inside TRL.

TRL's contract (`GRPOTrainer._calculate_rewards`): a reward function returns one value per completion, a number or
`None`. A per-completion `None` is legal and means "not applicable" (TRL turns it into NaN, and multi-reward setups
rely on it), so it is kept. What is never legal, and what TRL reports only as `'NoneType' object is not iterable` or a
`torch.tensor` conversion error, is:

- the whole return value `None` (the function forgot its `return`);
- something that is not a list of numbers / `None` (a string, a dict, a tensor of the wrong shape, a nested list);
- a list of the wrong length (TRL says so too, but without what was returned).

[`check_reward_funcs`] wraps plain Python reward functions once, at trainer init; models (`nn.Module`) are left as they
are. The wrapper keeps `__name__`, so TRL's metric names (`rewards/<name>/mean`) do not change.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any


class RewardFunctionError(TypeError):
    """A reward function returned something TRL cannot use; the message names the function and what it returned."""


def _describe(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _is_reward(value: Any) -> bool:
    # bool is a Number too; TRL converts it to 0.0/1.0, so it is accepted like an int.
    if value is None or isinstance(value, numbers.Real):
        return True
    return getattr(value, "ndim", None) == 0  # a 0-d tensor / numpy scalar


def check_rewards(name: str, rewards: Any, expected: int | None) -> None:
    """Raise [`RewardFunctionError`] unless `rewards` is a sequence of `expected` (any if `None`) numbers or `None`s."""
    if rewards is None:
        raise RewardFunctionError(
            f"The reward function {name!r} returned None instead of a list of rewards: did it forget its "
            "`return`? (Return None per completion, inside the list, to mark it as not scored.)"
        )
    if isinstance(rewards, (str, bytes, dict)) or not isinstance(rewards, Sequence) and not hasattr(rewards, "tolist"):
        raise RewardFunctionError(
            f"The reward function {name!r} returned {_describe(rewards)} ({type(rewards).__name__}); it must return a "
            f"list of floats, one per completion (None for a completion it does not score)."
        )
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    if not isinstance(values, list) or (expected is not None and len(values) != expected):
        got = len(values) if isinstance(values, list) else "a scalar"
        raise RewardFunctionError(
            f"The reward function {name!r} returned {got} rewards for {expected} completions "
            f"({_describe(rewards)}); it must return one reward per completion."
        )
    bad = next((value for value in values if not _is_reward(value)), _MISSING)
    if bad is not _MISSING:
        raise RewardFunctionError(
            f"The reward function {name!r} returned a non-number, {_describe(bad)} ({type(bad).__name__}), in "
            f"{_describe(rewards)}; each reward must be a float, or None for a completion it does not score."
        )


_MISSING = object()


class CheckedRewardFunc:
    """`func`, with its return value checked against the number of completions it was given (picklable, like `func`)."""

    def __init__(self, func: Callable[..., Any], name: str):
        self.func = func
        self.__name__ = name  # TRL names the metrics after it: `rewards/<name>/mean`
        self.__wrapped__ = func
        self.__doc__ = getattr(func, "__doc__", None)

    def _check(self, rewards: Any, kwargs: dict[str, Any]) -> Any:
        completions = kwargs.get("completions")
        check_rewards(self.__name__, rewards, len(completions) if completions is not None else None)
        return rewards

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._check(self.func(*args, **kwargs), kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.func!r})"


class CheckedAsyncRewardFunc(CheckedRewardFunc):
    """[`CheckedRewardFunc`] of an `async` reward function (TRL awaits it on its event loop)."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._check(await self.func(*args, **kwargs), kwargs)


def checked_reward_func(func: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """`func` wrapped so that a wrong return value raises [`RewardFunctionError`] naming it (wrapped once only)."""
    if isinstance(func, CheckedRewardFunc):
        return func
    from trl.trainer.utils import get_callable_name, is_async_callable

    wrapper = CheckedAsyncRewardFunc if is_async_callable(func) else CheckedRewardFunc
    return wrapper(func, name or get_callable_name(func))


def check_reward_funcs(reward_funcs: list[Any], names: Sequence[str]) -> list[Any]:
    """`reward_funcs` with every Python callable wrapped by [`checked_reward_func`] (models left as they are).

    `names` are TRL's `reward_func_names`, so errors name the function as the logged metrics do.
    """
    import torch.nn as nn

    return [
        func if isinstance(func, nn.Module) or not callable(func) else checked_reward_func(func, name)
        for func, name in zip(reward_funcs, names, strict=True)
    ]
