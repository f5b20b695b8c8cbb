"""torch.func transforms and forward-mode AD through the layers and the op, against torch.nn.

Under a transform (or in a forward-AD context) the call is routed to torch's op, whose rules the
transforms need; a backward recorded outside and batched inside (``check_batched_grad``) is
computed in torch ops. Each transform is checked against torch.nn's result on the same input.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jvp, vmap

import batchnorm
from conftest import TOL, make_input

F64 = TOL[torch.float64]
# torch.func's own machinery calls the deprecated torch.jit.script; the notice is torch's.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")


def _pair(kind, **kwargs):
    ours = getattr(batchnorm, kind)(3, **kwargs).double()
    theirs = getattr(torch.nn, kind)(3, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return ours, theirs


SHAPES = {"BatchNorm1d": (6, 3), "BatchNorm2d": (4, 3, 2, 3)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", SHAPES)
def test_jvp_jacfwd_and_forward_ad_match_torch(kind, training, gen):
    ours, theirs = _pair(kind, track_running_stats=False)
    if not training:  # evaluation needs running statistics
        ours, theirs = _pair(kind)
        ours.eval(), theirs.eval()
    x = make_input(SHAPES[kind], torch.float64, generator=gen, scale=2.0)
    t = make_input(SHAPES[kind], torch.float64, generator=gen)
    for name, run in {
        "jvp": lambda m: jvp(m, (x,), (t,))[1],
        "jacfwd": lambda m: jacfwd(m)(x),
    }.items():
        torch.testing.assert_close(run(ours), run(theirs), **F64, msg=name)
    tangents = []
    for m in (ours, theirs):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    torch.testing.assert_close(*tangents, **F64)


@pytest.mark.parametrize("kind", SHAPES)
def test_vmap_and_per_sample_gradients_match_torch(kind, gen):
    ours, theirs = _pair(kind, track_running_stats=False)
    xs = make_input((5, *SHAPES[kind]), torch.float64, generator=gen, scale=2.0)
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), **F64)

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, x):  # one "sample" is a whole batch here, as in MAML's tasks
            return (functional_call(module, p, (x,)) ** 3).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, xs)

    got, want = per_sample(ours), per_sample(theirs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64, msg=name)


def test_vmap_over_running_statistics_raises_as_torch_does(gen):
    # torch's op cannot update unbatched running statistics from a batched input; neither can
    # ours, which hands the call to it, and both raise the same class.
    ours, theirs = _pair("BatchNorm1d")
    xs = make_input((5, 6, 3), torch.float64, generator=gen)
    errors = []
    for m in (ours, theirs):
        with pytest.raises(Exception) as caught:  # noqa: PT011 - torch's class is the oracle
            vmap(m)(xs)
        errors.append(caught.value)
    assert type(errors[0]) is type(errors[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_batched_grad_and_forward_ad(training, gen):
    x = make_input((6, 3), torch.float64, generator=gen).requires_grad_(True)
    w = torch.rand(3, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def op(x, w):
        return batchnorm.batch_norm(x, None if training else rm, None if training else rv, w,
                                    None, training=training)  # fmt: skip

    with batchnorm.use_routing(eval_native_bytes=0):  # the eval kernels' backward too
        assert torch.autograd.gradcheck(op, (x, w), check_batched_grad=True, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(op, (x, w), check_batched_grad=True)


def test_maml_style_inner_step_matches_torch(gen):
    # grad of a loss after one inner SGD step, through functional_call with new parameters.
    ours, theirs = _pair("BatchNorm2d", track_running_stats=False)
    x = make_input((4, 3, 2, 3), torch.float64, generator=gen, scale=2.0)

    def outer(module):
        def inner_loss(p):
            return functional_call(module, p, (x,)).pow(3).sum()

        def after_step(p):
            g = grad(inner_loss)(p)
            return inner_loss({k: p[k] - 0.1 * g[k] for k in p})

        params = {k: v.detach() for k, v in module.named_parameters()}
        return grad(after_step)(params)

    got, want = outer(ours), outer(theirs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F64, msg=name)
