"""The network between a tower's concatenated feature encodings and its L2 normalisation.

Two families, picked by the config's ``kind`` through ``NETWORKS``:

    mlp: a stack of Linear layers; ``widths=[]`` is the identity.
    dcn: Deep & Cross Network v2 (Wang et al. 2021), explicit feature crosses
         x_{l+1} = x0 * (W x_l + b) + x_l beside or before an MLP, then a projection.

The original DSSM tower (letter-trigram hashing -> 300 -> 300 -> 128, tanh throughout)
is ``MLPConfig(widths=[300, 128], activation="tanh", activate_input=True,
activate_output=True)`` over a 300-wide sum-pooled trigram embedding: that embedding is
the bias-free first layer, so the input activation completes it.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower.towers.config import DCNConfig, MLPConfig, NetworkConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _hidden_layers(
    input_dim: int, widths: list[int], activation: str, dropout: float, layer_norm: bool
) -> list[nn.Module]:
    """Linear -> LayerNorm (optional) -> activation -> Dropout (optional), per width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Linear(input_dim, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        input_dim = width
    return layers


class MLP(nn.Module):
    """Hidden layers, then a plain Linear (activated only if ``activate_output``).

    Args:
        input_dim: D_in, the width of the concatenated feature encodings.
        config: the layer widths and options.

    Attributes:
        output_dim: ``widths[-1]``, or ``input_dim`` when ``widths`` is empty.
    """

    def __init__(self, input_dim: int, config: MLPConfig) -> None:
        super().__init__()
        widths = list(config.widths)
        act = ACTIVATIONS[config.activation]
        layers: list[nn.Module] = [act()] if config.activate_input else []
        if widths:
            *hidden, last = widths
            layers += _hidden_layers(
                input_dim, hidden, config.activation, config.dropout, config.layer_norm
            )
            layers.append(nn.Linear(hidden[-1] if hidden else input_dim, last))
            if config.activate_output:
                layers.append(act())
        self.layers = nn.Sequential(*layers)
        self.output_dim = widths[-1] if widths else input_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps (B, D_in) encodings to (B, output_dim)."""
        return self.layers(x)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l, elementwise product.

    ``self.linear`` computes W x + b: ``nn.Linear(D, D)`` at full rank, or
    ``Linear(D, r, bias=False)`` then ``Linear(r, D)`` so that W = U V^T at rank r.
    PyTorch's default Linear initialisation is kept: the residual x_l passes through
    unchanged, so a freshly built stack starts as the input plus a bounded cross term.

    Args:
        dim: D, the width of x0 and x_l.
        low_rank: 0 for full rank, else the rank r of W.
    """

    def __init__(self, dim: int, low_rank: int = 0) -> None:
        super().__init__()
        if low_rank > 0:
            self.linear: nn.Module = nn.Sequential(
                nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim)
            )
        else:
            self.linear = nn.Linear(dim, dim)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Crosses x_l with the input x0.

        Args:
            x0: (B, D) the input of the first cross layer.
            x: (B, D) the output of the previous cross layer (x0 for the first).

        Returns:
            (B, D) x_{l+1}.
        """
        return x0 * self.linear(x) + x


class DCN(nn.Module):
    """Deep & Cross Network v2, stacked or parallel, ending in a Linear to ``dim``.

    stacked:  x0 -> cross layers -> deep MLP -> Linear(widths[-1] or D_in, dim)
    parallel: [cross(x0), deep(x0)] concatenated -> Linear(D_in + widths[-1], dim)

    Args:
        input_dim: D_in, the width of the concatenated feature encodings.
        config: the cross and deep parts' options.

    Attributes:
        output_dim: ``config.dim``.
    """

    def __init__(self, input_dim: int, config: DCNConfig) -> None:
        super().__init__()
        widths = list(config.widths)
        self.parallel = config.structure == "parallel"
        self.cross = nn.ModuleList(
            CrossLayer(input_dim, config.low_rank) for _ in range(config.cross_layers)
        )
        self.deep = nn.Sequential(
            *_hidden_layers(input_dim, widths, config.activation, config.dropout, config.layer_norm)
        )
        # Without a deep part the cross output alone reaches the projection.
        deep_dim = widths[-1] if widths else 0
        projected_dim = input_dim + deep_dim if self.parallel else deep_dim or input_dim
        self.projection = nn.Linear(projected_dim, config.dim)
        self.output_dim = config.dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Maps (B, D_in) encodings to (B, dim)."""
        crossed = x0
        for layer in self.cross:
            crossed = layer(x0, crossed)
        if not self.parallel:
            return self.projection(self.deep(crossed))
        if len(self.deep) == 0:  # an empty Sequential is the identity: x0 would repeat
            return self.projection(crossed)
        return self.projection(torch.cat([crossed, self.deep(x0)], dim=-1))


NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "dcn": DCN}


def build_network(config: NetworkConfig, input_dim: int) -> nn.Module:
    """Builds the network named by ``config.kind``.

    Args:
        config: an ``MLPConfig`` or a ``DCNConfig``.
        input_dim: D_in, the width of the concatenated feature encodings.

    Returns:
        A module mapping (B, D_in) to (B, output_dim); it has an ``output_dim`` attribute.
    """
    if input_dim <= 0:
        raise ValueError(f"input_dim must be > 0, got {input_dim}")
    return NETWORKS[config.kind](input_dim, config)
