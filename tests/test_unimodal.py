"""The uni-modal baseline network (paper Sec. 6.4; SPEC Sec. 9): one branch with an SE block wherever the
two-branch model has an MMTM, with that MMTM's hidden size."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from custom_branches import CUSTOM
from greedymm.models import (SqueezeExcite, UniModalNet, conv_branch, final_linear, mmtm_convnet, mmtm_digits,
                             mmtm_resnet18)


def seq_image_inputs(n):
    return torch.randn(n, 2, 16), torch.randn(n, 3, 8, 8)


# name -> (two-branch builder, inputs (x0, x1) for a batch of n)
MODELS = {
    "resnet18": (lambda: mmtm_resnet18(num_classes=5, in_channels=1), lambda n: (torch.randn(n, 1, 32, 32),) * 2),
    "conv": (lambda: mmtm_convnet(4, widths=(4, 8, 6), fusion_stages=["stage2", "stage3"]),
             lambda n: (torch.randn(n, 3, 12, 12),) * 2),
    "digits": (lambda: mmtm_digits(10, channels=(3, 1)), lambda n: (torch.randn(n, 3, 28, 28),
                                                                     torch.randn(n, 1, 28, 28))),
    "mlp": (CUSTOM["mlp"][0], lambda n: (torch.randn(n, 10), torch.randn(n, 7))),  # C_A != C_B
    "seq_image": (CUSTOM["seq_image"][0], seq_image_inputs),  # Conv1d branch, Conv2d branch
}


def se_by_hand(se, x):
    """s = mean over the spatial dims, z = ReLU(W_s s + b_s), x * sigmoid(W_e z + b_e)."""
    s = x.reshape(x.shape[0], x.shape[1], -1).mean(-1) if x.dim() > 2 else x  # (B, C)
    z = torch.relu(s @ se.fc_squeeze.weight.T + se.fc_squeeze.bias)  # (B, hidden)
    scale = torch.sigmoid(z @ se.fc_excite.weight.T + se.fc_excite.bias)  # (B, C)
    return x * scale.reshape(scale.shape + (1,) * (x.dim() - 2))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("modality", [0, 1])
def test_unimodal_net_from_every_branch_type(name, modality):
    torch.manual_seed(0)
    build, inputs = MODELS[name]
    two = build().eval()
    net = UniModalNet.from_two_branch(two, modality).eval()
    assert net.modality == modality and not hasattr(net, "cls_groups")
    # an SE block where each MMTM was, on this branch's channels, with the MMTM's hidden size
    assert list(net.se) == list(two.mmtms)
    for stage, m in two.mmtms.items():
        se = net.se[stage]
        assert isinstance(se, SqueezeExcite)
        assert (se.channels, se.hidden) == ((m.channels_a, m.hidden) if modality == 0 else (m.channels_b, m.hidden))
        assert se.fc_squeeze.weight.shape == (m.hidden, se.channels)
    # the same weights as the chosen branch, but nothing shared with the two-branch model
    source = two.branch1 if modality == 1 else two.branch0
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in net.branch.state_dict().items())
    assert {id(p) for p in net.parameters()}.isdisjoint({id(p) for p in two.parameters()})
    x = inputs(3)[modality]
    with torch.no_grad():
        out = net(x)
        # by hand: the branch's stages with an SE block after the MMTM stages
        h = x
        for stage in net.stage_names:
            h = getattr(source, stage)(h)
            if stage in two.mmtms:
                h = se_by_hand(net.se[stage], h)
    assert out.shape == (3, final_linear(source).out_features)
    assert_close(out, h)


def test_unimodal_net_checks_its_arguments():
    two = mmtm_convnet(3, widths=(4, 8))
    with pytest.raises(ValueError, match="modality=2 must be 0"):
        UniModalNet.from_two_branch(two, 2)
    with pytest.raises(ValueError, match="not stages of the branch before its last"):
        UniModalNet(conv_branch(3, widths=(4, 8)), {"head": SqueezeExcite(8)}, 0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        UniModalNet(nn.Linear(3, 3), {}, 0)


def test_unimodal_net_trains_its_branch_and_se_blocks():
    torch.manual_seed(0)
    net = UniModalNet.from_two_branch(mmtm_convnet(3, widths=(4, 8)), 1).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in net.named_parameters()}
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    assert all(not torch.equal(v, before[k]) for k, v in net.named_parameters() if k.startswith("se."))
