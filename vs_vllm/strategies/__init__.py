"""Token-selection strategies behind one interface, looked up by name.

``learned`` needs a scorer checkpoint; the others are training-free.
"""

from __future__ import annotations

from vs_vllm.scorer import VisionSelectorScorer
from vs_vllm.strategies.base import ScoreStrategy, SelectionStrategy
from vs_vllm.strategies.diversity import DiversityStrategy
from vs_vllm.strategies.learned import LearnedStrategy
from vs_vllm.strategies.norm import NormStrategy
from vs_vllm.strategies.random import RandomStrategy
from vs_vllm.strategies.uniform import UniformStrategy

DEFAULT_STRATEGY = "learned"

_REGISTRY: dict[str, type[SelectionStrategy]] = {
    cls.name: cls
    for cls in (LearnedStrategy, UniformStrategy, RandomStrategy, NormStrategy, DiversityStrategy)
}


def available_strategies() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def strategy_class(name: str) -> type[SelectionStrategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown vision selector strategy {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None


def build_strategy(name: str, scorer: VisionSelectorScorer | None = None) -> SelectionStrategy:
    """An instance of strategy ``name``; ``learned`` needs ``scorer``."""
    cls = strategy_class(name)
    if cls is LearnedStrategy:
        if scorer is None:
            raise ValueError("the 'learned' strategy needs a scorer checkpoint")
        return LearnedStrategy(scorer)
    return cls()


__all__ = [
    "DEFAULT_STRATEGY",
    "DiversityStrategy",
    "LearnedStrategy",
    "NormStrategy",
    "RandomStrategy",
    "ScoreStrategy",
    "SelectionStrategy",
    "UniformStrategy",
    "available_strategies",
    "build_strategy",
    "strategy_class",
]
