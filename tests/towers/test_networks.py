import pytest
import torch
from torch import nn

from twotower.config import from_dict
from twotower.errors import ConfigError
from twotower.towers.config import DCNConfig, MLPConfig, NetworkConfig
from twotower.towers.networks import DCN, MLP, NETWORKS, CrossLayer, build_network


def _types(module: nn.Sequential) -> list[type]:
    return [type(m) for m in module]


# MLP


@pytest.mark.parametrize(("widths", "expected"), [([], 6), ([5], 5), ([8, 3], 3), ([16, 8, 4], 4)])
def test_mlp_output_shape_and_dim(widths, expected):
    mlp = MLP(6, MLPConfig(widths=widths))
    out = mlp(torch.randn(7, 6))
    assert mlp.output_dim == expected
    assert out.shape == (7, expected)


def test_mlp_without_widths_is_the_identity():
    x = torch.randn(4, 6)
    assert torch.equal(MLP(6, MLPConfig(widths=[]))(x), x)
    assert torch.equal(MLP(6, MLPConfig(widths=[], activate_input=True))(x), torch.relu(x))


def test_mlp_layer_order_with_layer_norm_and_dropout():
    mlp = MLP(10, MLPConfig(widths=[8, 6, 4], layer_norm=True, dropout=0.1))
    hidden = [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout]
    assert _types(mlp.layers) == [*hidden, *hidden, nn.Linear]


def test_mlp_activated_output_has_no_dropout_or_layer_norm():
    config = MLPConfig(widths=[8, 4], layer_norm=True, dropout=0.1, activate_output=True)
    mlp = MLP(10, config)
    assert _types(mlp.layers) == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]


@pytest.mark.parametrize(
    ("activation", "module"), [("relu", nn.ReLU), ("tanh", nn.Tanh), ("gelu", nn.GELU)]
)
def test_mlp_activation_choices(activation, module):
    mlp = MLP(6, MLPConfig(widths=[5, 3], activation=activation))
    assert _types(mlp.layers) == [nn.Linear, module, nn.Linear]


def test_mlp_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    mlp = MLP(32, MLPConfig(widths=[64, 16], dropout=0.5))
    x = torch.randn(8, 32)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


def test_dssm_shape():
    # DSSM: trigram embedding (300, done by the encoder) -> tanh -> 300 -> tanh -> 128 -> tanh.
    config = MLPConfig(
        widths=[300, 128], activation="tanh", activate_input=True, activate_output=True
    )
    mlp = MLP(300, config)
    assert _types(mlp.layers) == [nn.Tanh, nn.Linear, nn.Tanh, nn.Linear, nn.Tanh]
    first, second = mlp.layers[1], mlp.layers[3]
    assert (first.in_features, first.out_features) == (300, 300)
    assert (second.in_features, second.out_features) == (300, 128)
    out = mlp(10 * torch.randn(16, 300))
    assert mlp.output_dim == 128
    assert out.shape == (16, 128)
    assert out.abs().max() < 1


# CrossLayer


def test_cross_layer_hand_computed():
    # x0 = [1, 2], x = [3, -1], W = [[1, 0], [2, 1]], b = [0.5, -1]
    # W x + b = [3 + 0.5, 6 - 1 - 1] = [3.5, 4]
    # x0 * (W x + b) + x = [1 * 3.5 + 3, 2 * 4 - 1] = [6.5, 7]
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, -1.0]))
    out = layer(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]))
    assert torch.allclose(out, torch.tensor([[6.5, 7.0]]))


def test_low_rank_cross_layer_equals_full_rank_with_the_product_weight():
    torch.manual_seed(0)
    low, full = CrossLayer(6, low_rank=2), CrossLayer(6)
    down, up = low.linear[0], low.linear[1]
    assert down.bias is None and down.weight.shape == (2, 6) and up.weight.shape == (6, 2)
    with torch.no_grad():
        full.linear.weight.copy_(up.weight @ down.weight)  # W = U V^T, rank 2
        full.linear.bias.copy_(up.bias)
    x0, x = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.allclose(low(x0, x), full(x0, x), atol=1e-6)


# DCN


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("widths", [[], [8], [8, 4]])
@pytest.mark.parametrize("low_rank", [0, 3])
def test_dcn_output_shape(structure, widths, low_rank):
    config = DCNConfig(structure=structure, widths=widths, low_rank=low_rank, dim=5)
    dcn = DCN(6, config)
    assert dcn.output_dim == 5
    assert dcn(torch.randn(7, 6)).shape == (7, 5)


# D_in = 6, two cross layers, widths [8, 4], dim 3:
#   full-rank cross layer: 6 * 6 + 6 = 42;  low-rank (r = 2): 6 * 2 + 2 * 6 + 6 = 30
#   deep: (6 * 8 + 8) + (8 * 4 + 4) = 92;  its LayerNorms: 2 * 8 + 2 * 4 = 24
#   projection, stacked: 4 * 3 + 3 = 15;  parallel: (6 + 4) * 3 + 3 = 33
#   widths [] (no deep part): projection 6 * 3 + 3 = 21 for either structure
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"structure": "stacked"}, 2 * 42 + 92 + 15),
        ({"structure": "parallel"}, 2 * 42 + 92 + 33),
        ({"structure": "stacked", "low_rank": 2}, 2 * 30 + 92 + 15),
        ({"structure": "parallel", "layer_norm": True}, 2 * 42 + 92 + 24 + 33),
        ({"structure": "stacked", "widths": []}, 2 * 42 + 21),
        ({"structure": "parallel", "widths": []}, 2 * 42 + 21),
        ({"structure": "stacked", "cross_layers": 0}, 92 + 15),
    ],
)
def test_dcn_parameter_count(overrides, expected):
    config = DCNConfig(**{"cross_layers": 2, "widths": [8, 4], "dim": 3, **overrides})
    assert sum(p.numel() for p in DCN(6, config).parameters()) == expected


def test_dcn_stacked_equals_its_parts_in_sequence():
    torch.manual_seed(0)
    dcn = DCN(6, DCNConfig(structure="stacked", widths=[8, 4], dim=3))
    x0 = torch.randn(5, 6)
    crossed = dcn.cross[1](x0, dcn.cross[0](x0, x0))
    assert torch.allclose(dcn(x0), dcn.projection(dcn.deep(crossed)))
    assert _types(dcn.deep) == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]


def test_dcn_parallel_equals_its_parts_side_by_side():
    torch.manual_seed(0)
    dcn = DCN(6, DCNConfig(structure="parallel", widths=[8, 4], dim=3))
    x0 = torch.randn(5, 6)
    crossed = dcn.cross[1](x0, dcn.cross[0](x0, x0))
    expected = dcn.projection(torch.cat([crossed, dcn.deep(x0)], dim=-1))
    assert torch.allclose(dcn(x0), expected)


# Every network


NETWORK_CONFIGS = [
    MLPConfig(widths=[8, 4], activation="gelu", layer_norm=True, activate_input=True),
    MLPConfig(widths=[8, 4], activation="tanh", activate_output=True),
    DCNConfig(structure="stacked", activation="gelu", layer_norm=True, widths=[8, 4], dim=3),
    DCNConfig(structure="parallel", activation="gelu", low_rank=2, widths=[8, 4], dim=3),
    DCNConfig(structure="parallel", widths=[], dim=3),
]
NETWORK_IDS = ["mlp-gelu-ln", "mlp-tanh-out", "dcn-stacked", "dcn-parallel-low-rank", "dcn-cross"]


@pytest.mark.parametrize("config", NETWORK_CONFIGS, ids=NETWORK_IDS)
def test_gradients_reach_every_parameter(config):
    torch.manual_seed(0)
    network = build_network(config, 6)
    out = network(torch.randn(16, 6))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in network.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config", NETWORK_CONFIGS, ids=NETWORK_IDS)
def test_build_network_picks_the_class_by_kind(config):
    network = build_network(config, 6)
    assert type(network) is NETWORKS[config.kind]
    assert network(torch.randn(2, 6)).shape == (2, network.output_dim)


def test_build_network_rejects_an_empty_input():
    with pytest.raises(ValueError, match="input_dim"):
        build_network(MLPConfig(), 0)


# Config validation


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (MLPConfig, {"widths": [8, 0]}, "widths"),
        (MLPConfig, {"dropout": 1.0}, "dropout"),
        (MLPConfig, {"dropout": -0.1}, "dropout"),
        (MLPConfig, {"activation": "sigmoid"}, "activation"),
        (DCNConfig, {"widths": [-4]}, "widths"),
        (DCNConfig, {"dropout": 1.5}, "dropout"),
        (DCNConfig, {"cross_layers": -1}, "cross_layers"),
        (DCNConfig, {"low_rank": -2}, "low_rank"),
        (DCNConfig, {"dim": 0}, "dim"),
        (DCNConfig, {"structure": "serial"}, "structure"),
    ],
)
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_config_loader_tells_the_networks_apart_and_locates_errors():
    where = "towers.query.network"
    assert from_dict(NetworkConfig, {"kind": "dcn", "low_rank": 4}, where) == DCNConfig(low_rank=4)
    assert from_dict(NetworkConfig, {"kind": "mlp", "widths": []}, where) == MLPConfig(widths=[])
    with pytest.raises(ConfigError, match=r"towers\.query\.network: dim must be > 0"):
        from_dict(NetworkConfig, {"kind": "dcn", "dim": 0}, where)
