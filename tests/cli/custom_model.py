"""Models for the loader tests: a user class (needs --trust-model) and a pickle that tries to run code."""
import os

import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Evil:
    """Unpickling this would create the marker file named by the environment."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def build():
    torch.manual_seed(0)
    return MyNet()
