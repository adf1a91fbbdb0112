"""Character-level data from Python's own documentation: ``pydoc_data.topics.topics`` (79 topics,
~465,000 characters of English prose and code), split by topic so no text is shared between train and
validation. The vocabulary is every character of all topics (train and validation)."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset


def load_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def split_topics(topics: dict[str, str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Topic names for train and validation: topics in a fixed shuffled order go to validation until
    it holds ``val_fraction`` of the characters; the split does not depend on the run's seed."""
    names = list(topics)
    random.Random(seed).shuffle(names)
    total, val, n = sum(map(len, topics.values())), [], 0
    for name in names:
        if n >= val_fraction * total:
            break
        val.append(name)
        n += len(topics[name])
    return sorted(set(names) - set(val)), sorted(val)


class CharData:
    """Encoded train and validation text (topics joined by a blank line) and the vocabulary."""

    def __init__(self, val_fraction: float = 0.1) -> None:
        topics = load_topics()
        self.train_topics, self.val_topics = split_topics(topics, val_fraction)
        self.chars = sorted(set("".join(topics.values())) | {"\n"})
        index = {c: i for i, c in enumerate(self.chars)}

        def encode(names: list[str]) -> torch.Tensor:
            text = "\n\n".join(topics[n] for n in names)
            return torch.tensor([index[c] for c in text], dtype=torch.long)

        self.train, self.val = encode(self.train_topics), encode(self.val_topics)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)


class RandomWindows(Dataset):
    """``steps`` batches of ``batch_size`` random windows (input, next-character target) of
    ``context`` characters; the windows depend only on ``seed`` (same batches for every method)."""

    def __init__(self, data: torch.Tensor, context: int, batch_size: int, steps: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data, self.offsets = data, torch.arange(context + 1)
        self.starts = torch.randint(0, len(data) - context - 1, (steps, batch_size), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.data[self.starts[i, :, None] + self.offsets]
        return w[:, :-1], w[:, 1:]


class FixedWindows(Dataset):
    """``n`` evenly spaced windows of the validation text, the same at every evaluation."""

    def __init__(self, data: torch.Tensor, context: int, n: int) -> None:
        starts = torch.linspace(0, len(data) - context - 2, n).long()
        self.windows = data[starts[:, None] + torch.arange(context + 1)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows[i, :-1], self.windows[i, 1:]
