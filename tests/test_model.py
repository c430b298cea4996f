import pytest
import torch
from torch import nn

from quicknat.model import QuickNAT, QuickNATConfig, count_parameters, set_mc_dropout, widen_filters, widen_input
from quicknat.model.blocks import ChannelSE, ChannelSpatialSE, DenseBlock, SpatialSE


def test_parameter_count_matches_original():
    n = count_parameters(QuickNAT(QuickNATConfig(num_classes=33, num_filters=64, se="none")))
    print(f"QuickNAT 64 filters, 33 classes, no SE: {n:,} parameters")
    assert 3_400_000 < n < 3_600_000


def test_blocks_own_their_modules_and_use_batch_norm():
    net = QuickNAT(QuickNATConfig(num_classes=5, num_filters=8, se="csse"))
    ses = [m for m in net.modules() if isinstance(m, ChannelSpatialSE)]
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout2d)]
    assert len(ses) == 8 and len({id(m) for m in ses}) == 8
    assert len(drops) == 8 and len({id(m) for m in drops}) == 8
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 9 * 3
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in net.modules()) == 4


def test_dense_block_wiring():
    b = DenseBlock(3, 4)
    assert b.conv1.in_channels == 3 and b.conv2.in_channels == 7 and b.conv3.in_channels == 11
    assert b.conv1.kernel_size == (5, 5) and b.conv3.kernel_size == (1, 1)


@pytest.mark.parametrize("se", ["none", "cse", "sse", "csse"])
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (16, 100)])
def test_any_input_size(se, size):
    net = QuickNAT(QuickNATConfig(num_classes=4, num_filters=6, se=se)).eval()
    out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 4, *size)


def test_se_modules_shapes():
    x = torch.randn(2, 6, 8, 8)
    for m in (ChannelSE(6), SpatialSE(6), ChannelSpatialSE(6)):
        assert m(x).shape == x.shape


def test_eval_is_deterministic_and_mc_dropout_is_not():
    torch.manual_seed(0)
    net = QuickNAT(QuickNATConfig(num_classes=4, num_filters=6, dropout=0.3))
    net.train()
    net(torch.randn(4, 1, 32, 32))  # give batch norm non-trivial running stats
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
        set_mc_dropout(net, True)
        a, b = net(x), net(x)
        assert not torch.equal(a, b)
        for k, v in net.state_dict().items():
            if "running" in k:
                assert torch.equal(v, stats[k]), f"{k} changed during MC inference"
        assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        set_mc_dropout(net, False)
        assert torch.equal(net(x), net(x))


def test_config_validation_and_round_trip():
    c = QuickNATConfig(num_classes=7, num_filters=16, se="cse", dropout=0.1)
    assert QuickNATConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        QuickNATConfig(se="bogus")


def randomise_batch_norm(net: nn.Module) -> nn.Module:
    """Batch norm statistics and affines that are not the identity (so widening is really tested)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net


def test_widen_input_computes_exactly_what_the_2d_network_did():
    torch.manual_seed(0)
    flat = randomise_batch_norm(QuickNAT(QuickNATConfig(num_classes=5, num_filters=8)).eval())
    wide = QuickNAT(QuickNATConfig(num_classes=5, num_filters=8, in_channels=5)).eval()
    wide.load_state_dict(widen_input(flat.state_dict(), wide.state_dict(), 1, 5))
    assert wide.config.context == 2 and flat.config.context == 0
    x = torch.rand(2, 5, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), flat(x[:, 2:3]), atol=1e-5, rtol=1e-5)
        x[:, [0, 1, 3, 4]] = torch.rand(2, 4, 32, 32)  # the neighbours do not count yet
        torch.testing.assert_close(wide(x), flat(x[:, 2:3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="widen"):
        widen_input(wide.state_dict(), flat.state_dict(), 5, 1)
    with pytest.raises(ValueError, match="odd"):
        QuickNATConfig(in_channels=2)


def test_widen_filters_computes_exactly_what_the_narrow_network_did():
    torch.manual_seed(0)
    narrow = randomise_batch_norm(QuickNAT(QuickNATConfig(num_classes=5, num_filters=6, in_channels=3)).eval())
    cfg = QuickNATConfig(num_classes=5, num_filters=10, in_channels=3)
    wide = QuickNAT(cfg)
    wide.load_state_dict(widen_filters(narrow.state_dict(), wide.state_dict(), cfg, 6))
    wide.eval()
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), narrow(x), atol=1e-5, rtol=1e-5)
    # the new filters are not dead: one training step moves what reads them away from zero
    wide.train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    wide(x).square().mean().backward()
    opt.step()
    assert wide.classifier.weight[:, 6:].abs().max() > 0
    with pytest.raises(ValueError, match="widen"):
        widen_filters(wide.state_dict(), narrow.state_dict(), narrow.config, 10)
    with pytest.raises(ValueError, match="se"):
        widen_filters(narrow.state_dict(), wide.state_dict(), QuickNATConfig(num_filters=10, se="cse"), 6)
