"""A user-style model for the profiler's --model test."""

from torch import nn


class Block(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def make():
    return nn.Sequential(Block(), Block())
