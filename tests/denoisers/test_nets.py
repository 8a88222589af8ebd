"""The three supervised networks: shapes, gradients, the residual paths, fine-tuning's parameter set, and the
2.5D application to whole volumes (ends replicated, U-Net padding, overlapping outputs averaged)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from denoisers.errors import DenoiserError
from denoisers.nets import NetSpec, build, level_feature
from denoisers.nets.infer import apply_25d, stack_indices

SMALL = {"gong-resnet": {"features": 8, "blocks": 2}, "xu-unet": {"features": 4, "depth": 2},
         "fo-dcnn": {"features": 8}}


@pytest.mark.parametrize("arch", list(SMALL))
def test_shapes_and_gradients_reach_every_parameter(arch: str) -> None:
    torch.manual_seed(0)
    net, spec = build(arch, SMALL[arch])
    x = torch.rand(2, spec.in_slices, 16, 24)
    y = net(x)
    assert y.shape == (2, spec.out_slices, 16, 24)
    y.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_paper_defaults() -> None:
    gong, gspec = build("gong-resnet")
    assert (gspec.in_slices, gspec.out_slices, len(gong.blocks), gong.features) == (5, 1, 5, 64)
    unet, uspec = build("xu-unet")
    assert (uspec.in_slices, unet.depth, uspec.multiple) == (3, 3, 8)  # three slices: the paper's Fig. 3
    assert sum(isinstance(m, nn.Conv2d) for m in unet.down[0]) == 2  # nc = 2 convolutions per stage
    fo, fspec = build("fo-dcnn")
    assert (fspec.in_slices, fspec.out_slices) == (3, 3)
    assert sum(isinstance(m, nn.Conv2d) for m in fo.modules()) == 8  # 8 layers


def _zero_last(net: nn.Module, name: str) -> None:
    layer = dict(net.named_modules())[name]
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def test_xu_unet_learns_a_residual_to_the_centre_slice() -> None:
    net, _ = build("xu-unet", {"in_slices": 3, "features": 4, "depth": 2})
    _zero_last(net, "out")
    x = torch.rand(1, 3, 8, 12)
    assert torch.equal(net.eval()(x), x[:, 1:2])
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 3, 10, 12))


def test_fo_dcnn_estimates_the_noise() -> None:
    net, _ = build("fo-dcnn", {"features": 4})
    _zero_last(net, f"noise.{len(net.noise) - 1}")  # the last conv: no noise estimated, the input comes back
    x = torch.rand(2, 3, 9, 7)
    assert torch.equal(net.eval()(x), x)


def test_gong_fine_tuning_trains_the_last_layers_and_every_batch_norm() -> None:
    net, _ = build("gong-resnet", {"features": 8, "blocks": 3})
    tuned = {id(p) for p in net.fine_tune_parameters(last_blocks=1)}
    names = {name for name, p in net.named_parameters() if id(p) in tuned}
    assert {"last.weight", "last.bias", "blocks.2.body.0.weight", "blocks.2.body.3.weight"} <= names
    assert {"first.1.weight", "blocks.0.body.1.weight", "blocks.1.body.4.bias"} <= names  # batch norms
    assert not {"first.0.weight", "blocks.0.body.0.weight", "blocks.1.body.3.weight"} & names
    assert len(tuned) == len(names)  # each parameter once


def test_unknown_or_misconfigured_networks_are_refused() -> None:
    with pytest.raises(DenoiserError, match="unknown network architecture 'unet3d'"):
        build("unet3d")
    with pytest.raises(DenoiserError, match="xu-unet.*in_slices must be 1, 3, 5 or 7"):
        build("xu-unet", {"in_slices": 4})
    with pytest.raises(DenoiserError, match="gong-resnet.*cannot be built"):
        build("gong-resnet", {"kernel": 5})


def test_stack_indices_replicate_the_end_slices() -> None:
    assert stack_indices(4, 5).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]


class _MeanOfStack(nn.Module):
    """Returns the mean of its input slices (1 out) or each slice unchanged plus the window mean (k out)."""

    def __init__(self, out_all: bool) -> None:
        super().__init__()
        self.out_all = out_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return x + mean if self.out_all else mean


def test_apply_25d_single_output_uses_replicated_neighbours() -> None:
    vol = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    out = apply_25d(_MeanOfStack(False), NetSpec(3, 1), vol, batch=3)
    expected = np.stack([vol[stack_indices(4, 3)[z]].mean(axis=0) for z in range(4)])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_apply_25d_pads_to_the_size_multiple_and_crops_back() -> None:
    net, spec = build("xu-unet", {"in_slices": 3, "features": 4, "depth": 2})
    _zero_last(net, "out")
    vol = np.random.default_rng(1).random((5, 30, 27)).astype(np.float32)
    out = apply_25d(net, spec, vol, batch=2)
    np.testing.assert_array_equal(out, vol)  # identity network: the padding never leaks into the result


def test_apply_25d_averages_overlapping_outputs_with_centre_weight() -> None:
    vol = np.random.default_rng(2).random((6, 4, 4)).astype(np.float32)
    out = apply_25d(_MeanOfStack(True), NetSpec(3, 3), vol, batch=4, centre_weight=2.0)
    windows = stack_indices(6, 3)
    z = 2  # seen by the windows centred on 1 (as channel 2), 2 (channel 1) and 3 (channel 0)
    preds = [(vol[z] + vol[windows[c]].mean(axis=0), 2.0 if c == z else 1.0) for c in (1, 2, 3)]
    expected = sum(w * p for p, w in preds) / 4.0
    np.testing.assert_allclose(out[z], expected, rtol=1e-5)


@pytest.mark.parametrize("arch", list(SMALL))
def test_dose_aware_networks_read_a_level_channel_and_keep_their_residual_on_the_image(arch: str) -> None:
    torch.manual_seed(0)
    net, spec = build(arch, {**SMALL[arch], "level_input": True})
    assert spec.level_input
    x = torch.rand(2, spec.in_slices + 1, 16, 16)
    y = net(x)
    assert y.shape == (2, spec.out_slices, 16, 16)
    y.square().mean().backward()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == spec.in_slices + 1
    assert float(first.weight.grad[:, -1].abs().sum()) > 0  # the level channel is learned from
    # The level changes the output (it is an input, not decoration).
    net.eval()
    with torch.no_grad():
        low, high = x.clone(), x.clone()
        low[:, -1], high[:, -1] = -2.0, 2.0
        assert float((net(low) - net(high)).abs().max()) > 1e-4


def test_apply_25d_feeds_the_level_and_requires_it_for_dose_aware_networks() -> None:
    torch.manual_seed(0)
    net, spec = build("fo-dcnn", {"features": 4, "layers": 3, "level_input": True})
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    volume = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    apply_25d(net, spec, volume, level=level_feature(0.2), batch=2)
    assert all(t.shape[1] == spec.in_slices + 1 for t in seen)
    assert all(torch.allclose(t[:, -1], torch.tensor(level_feature(0.2))) for t in seen)
    assert level_feature(0.2) == pytest.approx(np.log(2.0))
    with pytest.raises(ValueError, match="dose-aware"):
        apply_25d(net, spec, volume)
