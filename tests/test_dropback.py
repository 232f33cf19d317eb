import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from golden.dropback import Dropback
from golden.prng import CounterInit
from golden.quantile import quantile_pass


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(40, 30, generator=g).requires_grad_(),
            torch.randn(40, generator=g).requires_grad_(),
            torch.randn(10, 40, generator=g).requires_grad_()]


def _grads(params, step, scale=0.1):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_topk_exact_count_reset_and_decay_sequence():
    ps = _params()
    w0 = [p.detach().clone() for p in ps]
    opt = Dropback(ps, lr=0.5, track_size=123, init_decay=0.8)
    decays = []
    for t in range(6):
        _grads(ps, t)
        opt.step()
        decays.append(opt.decay)
        mask = _flat(opt.mask)
        assert int(mask.sum()) == 123 == opt.tracked_count
        target = _flat([w * np.float32(opt.decay) for w in w0])
        assert torch.equal(_flat(ps)[~mask], target[~mask])
    expect = [1.0]
    for _ in range(5):
        expect.append(expect[-1] * 0.8)  # multiplied once per step after the first
    assert decays == expect


def test_topk_tracks_largest_scores_and_ties_go_to_lower_index():
    p = torch.zeros(10, requires_grad=True)
    opt = Dropback([p], lr=1.0, track_size=4)
    p.grad = -torch.tensor([1.0, 5.0, 2.0, 2.0, 5.0, 2.0, 0.0, 2.0, 3.0, 2.0])
    opt.step()
    # 5, 5, 3 are tracked; of the five 2.0 ties the lowest index (2) wins
    assert opt.mask[0].nonzero().view(-1).tolist() == [1, 2, 4, 8]
    assert opt.threshold == 2.0


def test_full_budget_equals_sgd_with_momentum_and_weight_decay():
    ps, ref = _params(), _params()
    opt = Dropback(ps, lr=0.1, track_size=sum(p.numel() for p in ps),
                   momentum=0.9, weight_decay=1e-2)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2)
    for t in range(5):
        _grads(ps, t)
        _grads(ref, t)
        opt.step()
        sgd.step()
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)
        for p, r in zip(ps, ref):
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[r]["momentum_buffer"])


@pytest.mark.parametrize("quantile", [None, 0.5])
def test_group_momentum_without_a_default_gets_its_own_buffers(quantile):
    # The optimizer's default momentum is 0, one group sets its own (and another turns
    # momentum on after two steps): their buffers are made as SGD makes them, and the
    # weights stay SGD's (full budget; quantile mode with every score above theta).
    ps, ref = _params(), _params()
    groups = lambda xs: [dict(params=xs[:2], momentum=0.9), dict(params=xs[2:])]  # noqa: E731
    n = sum(p.numel() for p in ps)
    opt = Dropback(groups(ps), lr=0.1, track_size=n, quantile=quantile, q_init=1e-30)
    sgd = torch.optim.SGD(groups(ref), lr=0.1)
    for t in range(4):
        if t == 2:
            opt.param_groups[1]["momentum"] = sgd.param_groups[1]["momentum"] = 0.5
        _grads(ps, t)
        _grads(ref, t)
        opt.step()
        sgd.step()
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)
            if "momentum_buffer" in sgd.state[r]:
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   sgd.state[r]["momentum_buffer"])
        assert ("momentum_buffer" in opt.state[ps[2]]) == (t >= 2)


def test_bad_group_hyperparameters_are_refused_at_the_step():
    ps = _params()
    opt = Dropback([dict(params=ps[:1], momentum=1.5), dict(params=ps[1:])], lr=0.1,
                   track_size=10)
    _grads(ps, 0)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"param group 0: momentum must be in \[0, 1\), not 1.5"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))  # nothing changed
    opt.param_groups[0]["momentum"] = 0.0
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param group 1: lr must be a finite number >= 0"):
        opt.step()


def test_sgd_step_is_one_fused_rounding_like_torch():
    # lr*g = (3*2**23 + 1) * 2**-28 lies exactly halfway between two float32 values
    # and w = 2**-100 is far below half an ulp of float64: the fused multiply-add
    # (one rounding, what torch's add_(g, alpha=-lr) does) rounds up; rounding
    # to float64 first and then to float32 (a former emulation) lands on the
    # midpoint and rounds to even, one ulp lower. 67 elements: vector body and
    # scalar tail.
    lr = 1006633 * 2.0**-24
    n = 67
    for hint in (True, False):
        p = torch.full((n,), 2.0**-100, requires_grad=True)
        q = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.01
             ).requires_grad_(True)
        opt = Dropback([p, q], lr=lr, track_size=100)
        opt.use_hint = hint
        gen = torch.Generator().manual_seed(1)
        for t in range(5):
            p.grad = torch.full((n,), -25 / 16 if t == 4 else 0.0)
            q.grad = torch.randn(1000, generator=gen) * 1e-3
            opt.step()
        ref = torch.full((n,), 2.0**-100, requires_grad=True)
        ref.grad = torch.full((n,), -25 / 16)
        torch.optim.SGD([ref], lr=lr).step()
        assert torch.equal(p.detach().view(torch.int32), ref.detach().view(torch.int32))
        assert bool((p.detach() == 12582913 * 2.0**-27).all()) and bool(opt.mask[0].all())
        # hint on: steps 2-5 ran the fused hint pass (hit or miss, the new weights
        # come from it); off: the plain update pass
        assert opt.hint_hits + opt.hint_misses == (4 if hint else 0)


def test_tracked_weights_follow_sgd_and_untracked_momentum_is_reset():
    ps = _params()
    opt = Dropback(ps, lr=0.1, track_size=500, momentum=0.9)
    _grads(ps, 0)
    opt.step()
    before = [p.detach().clone() for p in ps]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in ps]
    _grads(ps, 1)
    expect = [w - 0.1 * (0.9 * b + p.grad) for w, b, p in zip(before, bufs, ps)]
    opt.step()
    m = _flat(opt.mask)
    assert torch.allclose(_flat(ps)[m], _flat(expect)[m], rtol=0, atol=1e-6)
    assert torch.all(_flat([opt.state[p]["momentum_buffer"] for p in ps])[~m] == 0)
    # untracked buffers were reset at step 1, so a tracked buffer is g1 + 0.9*(g0 or 0)
    assert bool(_flat([opt.state[p]["momentum_buffer"] for p in ps])[m].abs().gt(0).all())


def test_quantile_mode_matches_sgd_then_estimator_pass():
    ps, ref = _params(), _params()
    n = sum(p.numel() for p in ps)
    q = 1 - 300 / n
    opt = Dropback(ps, lr=0.3, track_size=300, quantile=q, q_init=0.05, q_step=1e-3,
                   init_decay=0.9)
    w0 = [p.detach().clone() for p in ref]
    theta = np.float32(0.05)
    decay = 1.0
    for t in range(4):
        _grads(ps, t)
        _grads(ref, t)
        opt.step()
        decay = decay * 0.9 if t else 1.0
        with torch.no_grad():
            for r in ref:
                r.add_(r.grad, alpha=-0.3)
            scores = _flat([(r - np.float32(decay) * w).abs() for r, w in zip(ref, w0)])
            mask, theta = quantile_pass(scores.numpy(), theta, q, 1e-3)
            mask = torch.from_numpy(mask)
            flat = _flat(ref)
            flat[~mask] = _flat([np.float32(decay) * w for w in w0])[~mask]
            off = 0
            for r in ref:
                r.copy_(flat[off:off + r.numel()].view(r.shape))
                off += r.numel()
        assert torch.equal(_flat(opt.mask), mask)
        assert opt.tracked_count == int(mask.sum())
        assert opt.threshold == float(theta)
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)


def test_counter_init_keeps_no_copy_and_matches_stored():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    b = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    CounterInit(5).apply_(a.parameters())
    CounterInit(5).apply_(b.parameters())
    oa = Dropback(a.parameters(), lr=0.2, track_size=40, init_decay=0.9,
                  init=CounterInit(5))
    ob = Dropback(b.parameters(), lr=0.2, track_size=40, init_decay=0.9)
    for p in a.parameters():
        for v in oa.state[p].values():
            assert not (isinstance(v, torch.Tensor) and v.is_floating_point()
                        and v.numel() == p.numel())
    x = torch.randn(32, 12)
    y = torch.randint(0, 4, (32,))
    for _ in range(8):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert torch.equal(_flat(oa.mask), _flat(ob.mask))


_RUN = """
import torch
from golden.dropback import Dropback
from golden.prng import CounterInit
ps = [torch.zeros(50, 20, requires_grad=True), torch.zeros(50, requires_grad=True)]
CounterInit(9).apply_(ps)
o = Dropback(ps, lr=0.1, track_size=100, init=CounterInit(9))
for t in range(3):
    g = torch.Generator().manual_seed(t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    o.step()
print(torch.cat([p.detach().view(-1) for p in ps]).tolist())
"""


def test_regeneration_reproducible_across_processes():
    # Top-k mode: its resets regenerate w0 from the index in each process. (The quantile
    # kernels' regeneration is checked bit for bit against the reference in-process; a
    # fresh process would spend minutes compiling them.) The two processes run at once.
    procs = [subprocess.Popen([sys.executable, "-c", _RUN], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and len(outs[0]) > 100


def test_params_without_grad_are_left_alone():
    ps = _params()
    before = ps[1].detach().clone()
    opt = Dropback(ps, lr=0.1, track_size=100)
    _grads(ps, 0)
    ps[1].grad = None
    opt.step()
    assert torch.equal(ps[1], before)
    assert int(opt.mask[0].sum() + opt.mask[2].sum()) == 100


@pytest.mark.parametrize("kwargs,msg", [
    (dict(track_size=-1), r"track_size must be an integer in \[0, 1640\]"),
    (dict(track_size=1641), r"track_size must be an integer in \[0, 1640\]"),
    (dict(track_size=2.5), r"track_size must be an integer in \[0, 1640\]"),
    (dict(lr=-0.1), r"lr must be a finite number >= 0"),
    (dict(momentum=-0.5), r"momentum must be in \[0, 1\)"),
    (dict(weight_decay=-1), r"weight_decay must be a finite number >= 0"),
    (dict(init_decay=0.0), r"init_decay must be in \(0, 1\]"),
    (dict(init_decay=1.5), r"init_decay must be in \(0, 1\]"),
    (dict(quantile=1.0), r"quantile must be in \(0, 1\)"),
    (dict(quantile=0.0), r"quantile must be in \(0, 1\)"),
    (dict(quantile=0.5, q_step=0), r"q_step must be in \(0, 1\)"),
    (dict(quantile=0.5, q_init=-1), r"q_init must be a finite number > 0"),
    (dict(init=3), r"init must be None or a CounterInit"),
])
def test_bad_arguments(kwargs, msg):
    args = dict(lr=0.1, track_size=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        Dropback(_params(), **args)


def test_non_float32_params_rejected():
    with pytest.raises(ValueError, match="params must be contiguous float32 CPU tensors"):
        Dropback([torch.zeros(3, dtype=torch.float64, requires_grad=True)], lr=0.1,
                 track_size=1)


def test_zero_budget_and_all_tied_scores():
    p = torch.ones(8, requires_grad=True)
    opt = Dropback([p], lr=1.0, track_size=0)
    p.grad = torch.full((8,), 0.5)
    opt.step()
    assert opt.tracked_count == 0 and not opt.mask[0].any()
    assert torch.equal(p.detach(), torch.ones(8))
    q = torch.ones(8, requires_grad=True)
    opt = Dropback([q], lr=1.0, track_size=3)
    q.grad = torch.zeros(8)  # every score is 0: the three lowest indices win
    opt.step()
    assert opt.mask[0].nonzero().view(-1).tolist() == [0, 1, 2]


def _run_pair(steps, *, counter=False, momentum=0.0, weight_decay=0.0, init_decay=0.95,
              track=600, grad_fn=None, direct=None):
    """The same steps on two optimizers: threshold hint on, and off (the full
    radix select on every step, the reference path). Returns both and their
    per-step (weights, mask, threshold). ``direct``: the hint pass's mask write
    (straight to the mask, or through its chunk buffer; None: the host's default)."""
    runs = []
    for hint in (True, False):
        g = torch.Generator().manual_seed(0)
        ps = [(torch.randn(60, 50, generator=g) * 0.05).requires_grad_(),
              torch.randn(50, generator=g).requires_grad_(),
              (torch.randn(7, 60, generator=g) * 0.05).requires_grad_()]
        init = CounterInit(3) if counter else None
        if counter:
            CounterInit(3).apply_(ps)
        opt = Dropback(ps, lr=0.05, track_size=track, momentum=momentum,
                       weight_decay=weight_decay, init_decay=init_decay, init=init)
        opt.use_hint = hint
        if direct is not None:
            opt.direct_mask = direct
        gen = torch.Generator().manual_seed(5)
        hist = []
        for t in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            if grad_fn is not None:
                grad_fn(t, ps, opt)
            opt.step()
            hist.append((_flat(ps).clone(), _flat(opt.mask).clone(), opt.threshold,
                         _flat([opt.state[p].get("momentum_buffer", torch.zeros(0))
                                for p in ps]).clone()))
        runs.append((opt, hist))
    return runs


def _assert_same(runs):
    (oa, ha), (ob, hb) = runs
    for t, (a, b) in enumerate(zip(ha, hb)):
        assert torch.equal(a[0].view(torch.int32), b[0].view(torch.int32)), t
        assert torch.equal(a[1], b[1]), t
        assert a[2] == b[2], t
        assert torch.equal(a[3].view(torch.int32), b[3].view(torch.int32)), t
    assert oa.tracked_count == ob.tracked_count


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("counter,momentum,weight_decay", [
    (False, 0.0, 0.0), (True, 0.0, 0.0), (False, 0.9, 1e-3), (True, 0.9, 0.0)])
def test_hint_path_bit_identical_to_radix_path(counter, momentum, weight_decay, direct):
    # both mask writes of the hint pass (each CPU runs one by default)
    runs = _run_pair(14, counter=counter, momentum=momentum, weight_decay=weight_decay,
                     direct=direct)
    _assert_same(runs)
    opt = runs[0][0]
    assert opt.hint_hits >= 8  # the hint path really ran (the first step has no hint)
    assert runs[1][0].hint_hits == 0


def test_hint_path_ties_at_threshold_and_jumps():
    # Ties: 40 equal scores straddling the threshold (lower index wins); jumps:
    # gradients scaled by 100 or 1/100 so the threshold leaves the band (misses in
    # both directions), then comes back.
    def grads(t, ps, opt):
        if t in (4, 9):
            ps[0].grad.mul_(100.0)
        if t == 6:
            ps[0].grad.mul_(0.01)
        if t >= 2 and t % 2 == 0 and math.isfinite(opt.threshold) and opt.threshold > 0:
            w0 = opt.w0(ps[0]).view(-1) * np.float32(opt.decay * opt.init_decay)
            flat = ps[0].detach().view(-1)
            # after the step, |w - d*w0| == the last threshold for 40 elements
            ps[0].grad.view(-1)[100:140] = (flat[100:140] - w0[100:140]
                                            - np.float32(opt.threshold)) / 0.05
    runs = _run_pair(14, grad_fn=grads)
    _assert_same(runs)
    assert runs[0][0].hint_misses >= 2 and runs[0][0].hint_hits >= 4


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_hint_path_lists_overflow(momentum, direct):
    # Lists of capacity 1 (then twice the last count): elements that do not fit
    # stay pending and are collected again after the pass, on hits and misses.
    def grads(t, ps, opt):
        opt._min_list = 1
        opt._listed = (0, 0)
        if t == 7:
            ps[0].grad.mul_(0.01)  # the threshold drops: a miss below the band
    runs = _run_pair(10, momentum=momentum, grad_fn=grads, direct=direct)
    _assert_same(runs)
    assert runs[0][0].hint_misses >= 1 and runs[0][0].hint_hits >= 5


@pytest.mark.parametrize("counter", [False, True])
def test_quantile_mode_with_momentum_and_weight_decay_matches_reference(counter):
    # Parameters of several chunks of the quantile pass (_QCHUNK elements, visited
    # last to first; the last one two full chunks and a partial one), momentum and
    # weight decay, stored or regenerated w0: weights, momentum buffers, mask and
    # theta equal torch.optim.SGD's step followed by the reference estimator pass
    # and the reset (untracked: d32*w0, momentum 0).
    from golden.dropback import _QCHUNK
    from golden.quantile import quantile_pass_reference
    long = 2 * _QCHUNK + 77
    ps = _params(3) + [torch.randn(long, generator=torch.Generator().manual_seed(5))]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    init = CounterInit(4) if counter else None
    if counter:
        CounterInit(4).apply_(ps)
        CounterInit(4).apply_(ref)
    n = sum(p.numel() for p in ps)
    q = 1 - 200 / n
    opt = Dropback(ps, lr=0.2, track_size=200, quantile=q, q_init=0.05, q_step=2e-3,
                   init_decay=0.8, momentum=0.9, weight_decay=1e-2, init=init)
    sgd = torch.optim.SGD(ref, lr=0.2, momentum=0.9, weight_decay=1e-2)
    w0 = [opt.w0(p).clone() for p in ps]
    theta = np.float32(0.05)
    decay = 1.0
    for t in range(5):
        _grads(ps, t)
        _grads(ref, t)
        opt.step()
        sgd.step()
        decay = decay * 0.8 if t else 1.0
        d32 = np.float32(decay)
        with torch.no_grad():
            scores = _flat([(r - d32 * w).abs() for r, w in zip(ref, w0)])
            mask, theta = quantile_pass_reference(scores.numpy(), theta, q, 2e-3)
            mask = torch.from_numpy(mask)
            off = 0
            for r, w in zip(ref, w0):
                mk = mask[off:off + r.numel()].view(r.shape)
                r[~mk] = (d32 * w)[~mk]
                sgd.state[r]["momentum_buffer"][~mk] = 0
                off += r.numel()
        assert 0 < int(mask.sum()) < n
        assert torch.equal(_flat(opt.mask), mask)
        assert opt.threshold == float(theta)
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[r]["momentum_buffer"])


@pytest.mark.parametrize("counter", [False, True])
def test_quantile_one_call_table_follows_grads_groups_and_lr_changes(counter):
    # Quantile mode takes every parameter in one kernel call through a table of
    # addresses (golden.dropback._quantile_all), whose static part is cached between
    # steps. Grads given as non-contiguous views (converted copies),
    # fresh grad tensors every step, a param without a grad on one step (left alone,
    # not scored), two param groups with their own lr and momentum (0 in one), an lr changed
    # between steps and a param's data replaced: weights, mask and theta equal
    # torch.optim.SGD followed by the reference estimator pass and the reset.
    from golden.quantile import quantile_pass_reference
    ps, ref = _params(5), _params(5)
    init = CounterInit(2) if counter else None
    if counter:
        CounterInit(2).apply_(ps)
        CounterInit(2).apply_(ref)
    n = sum(p.numel() for p in ps)
    q = 1 - 150 / n
    groups = lambda xs: [dict(params=[xs[0]], lr=0.2, momentum=0.0),  # noqa: E731
                         dict(params=[xs[1], xs[2]], lr=0.1)]
    opt = Dropback(groups(ps), lr=0.3, track_size=150, quantile=q, q_init=0.05, q_step=2e-3,
                   init_decay=0.8, momentum=0.5, init=init)
    sgd = torch.optim.SGD(groups(ref), lr=0.3, momentum=0.5)
    w0 = [opt.w0(p).clone() for p in ps]
    theta = np.float32(0.05)
    decay = 1.0
    for t in range(5):
        _grads(ref, t)
        for p, r in zip(ps, ref):
            p.grad = r.grad.clone()
        ps[2].grad = ps[2].grad.t().contiguous().t()  # a non-contiguous view
        assert not ps[2].grad.is_contiguous()
        if t == 2:
            ps[1].grad = ref[1].grad = None
        if t == 3:
            for o in (opt, sgd):
                o.param_groups[0]["lr"] = 0.05
        if t == 4:  # (not on a step where the set of params with a grad changes)
            with torch.no_grad():  # new storage for a parameter (same values)
                ps[2].data = ps[2].data.clone()
        opt.step()
        sgd.step()
        decay = decay * 0.8 if t else 1.0
        d32 = np.float32(decay)
        live = [i for i, r in enumerate(ref) if r.grad is not None]
        with torch.no_grad():
            scores = _flat([(ref[i] - d32 * w0[i]).abs() for i in live])
            mask, theta = quantile_pass_reference(scores.numpy(), theta, q, 2e-3)
            mask = torch.from_numpy(mask)
            off = 0
            for i in live:
                r = ref[i]
                mk = mask[off:off + r.numel()].view(r.shape)
                r[~mk] = (d32 * w0[i])[~mk]
                if "momentum_buffer" in sgd.state[r]:
                    sgd.state[r]["momentum_buffer"][~mk] = 0
                off += r.numel()
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.equal(_flat([opt.mask[i] for i in live]), mask)
        assert opt.tracked_count == int(mask.sum())
        assert opt.threshold == float(theta)
        for p, r in zip(ps, ref):
            assert torch.equal(p, r)
        for i in (1, 2):
            assert torch.equal(opt.state[ps[i]]["momentum_buffer"],
                               sgd.state[ref[i]]["momentum_buffer"])
