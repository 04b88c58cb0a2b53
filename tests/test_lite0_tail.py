"""EfficientNet-Lite0 with a trainable tail: the split computes what the whole network computes, only the tail
trains, BatchNorm statistics never move, and the frozen front runs once per sample."""

from __future__ import annotations

import pytest
import torch

from cltoolbox.errors import ConfigError
from cltoolbox.models.lite0_tail import TailClassifier, efficientnet_lite0_tail, split_lite0
from cltoolbox.models.pretrained import efficientnet_lite0_imagenet, to_imagenet_input

pytest.importorskip("timm")


def test_front_then_tail_equals_the_whole_network_and_maps_input_gives_the_same_features() -> None:
    torch.manual_seed(0)
    net = efficientnet_lite0_imagenet(pretrained=False)
    net.reset_classifier(0)
    net.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        whole = net(to_imagenet_input(x, (1, 28, 28), 64))
    for n in (1, 4):
        model = efficientnet_lite0_tail((1, 28, 28), 10, pretrained=False, tail_blocks=n, resize=64)
        model.tail.load_state_dict(split_lite0(net, n)[1].state_dict())
        model.front.load_state_dict(split_lite0(net, n)[0].state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model.features(x), whole, rtol=1e-4, atol=1e-5)
            maps = model.maps(x)
        assert maps.shape == (3, 192, 2, 2)  # 192 channels at 1/32 of 64 px
        on_maps = TailClassifier(None, model.tail, 10, maps.shape[1:], 64)
        with torch.no_grad():
            torch.testing.assert_close(on_maps.features(maps), whole, rtol=1e-4, atol=1e-5)


def test_only_the_tail_trains_batchnorm_statistics_stay_and_the_front_runs_once_per_sample() -> None:
    torch.manual_seed(0)
    model = efficientnet_lite0_tail((1, 28, 28), 4, pretrained=False, tail_blocks=1, resize=32)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for p in model.front.parameters())
    assert all(p.requires_grad for p in model.tail.parameters())
    stats = model.tail[0].bn1.running_mean.clone()
    x = torch.rand(5, 1, 28, 28)
    model(x).sum().backward()
    torch.testing.assert_close(model.tail[0].bn1.running_mean, stats)  # never updated, even in train mode
    assert model.tail[0].conv_pw.weight.grad is not None
    assert model.cache.misses == 5
    model(x)
    assert model.cache.misses == 5 and model.cache.hits == 5  # the front ran once per sample


def test_tail_blocks_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tail_blocks"):
        efficientnet_lite0_tail((1, 28, 28), 10, pretrained=False, tail_blocks=5)
