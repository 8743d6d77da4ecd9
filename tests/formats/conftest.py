"""Small generic models for the format tests: a ResNet-style CNN and a tiny BERT, built from code."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Block(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus a 1x1 projection shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """(N, 3, 16, 16) -> (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.fixture
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval()


def randomize_peft_lora(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Random A and B for every LoRA matrix of a PEFT model (convlora models: convlora.testing.randomize_lora_)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


@pytest.fixture(name="randomize_peft_lora")
def _randomize_peft_lora_fixture():
    return randomize_peft_lora
