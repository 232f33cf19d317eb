"""The CubistMerge merge unit (hw.cubist): constructor checks, reproducible Verilog, no
combinational valid->ready path, and the cocotb testbench (bit-exact against
golden.cubist_fixed) on both simulators."""

import random

import pytest
from amaranth.sim import Simulator

from hw.cubist import CubistMerge, design_from_params
from hw.designs import build
from sim.runner import simulate, to_verilog

# One small configuration for the fast tests: an 8x8 grid holds the real ViT features.
FAST = dict(h=8, w=8, c=16, lanes=4, width=8, frac_bits=16, max_prefix=2, unmerge=1)


def _run(simulator, design, **tb):
    r = simulate(design_from_params(**design), test_module="sim.tb.tb_cubist",
                 simulator=simulator, name="cubist", params={**design, "seed": 3, **tb})
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    return r


def test_bit_exact_on_both_simulators(simulator):
    r = _run(simulator, FAST, frames=8, gap=0.25, stall=0.3, real_frames=1)
    assert r.tests == 6
    m = r.metrics
    assert m["frames_checked"] == 10
    assert m["three_way_merges"] > 0 and m["worst_case_three_way_merges"] > 0
    assert m["real_frames_checked"] == 2
    assert m["unmerge_frames_checked"] == 4
    assert m["error_cases"] == 10


def test_16_bit_tokens_and_odd_frac_bits():
    design = dict(FAST, h=5, w=6, c=8, lanes=2, width=16, frac_bits=11, max_prefix=1)
    _run("icarus" if _have("icarus") else "verilator", design, frames=6, real=0)


def test_one_beat_per_token():
    """C = P: one beat a token, the tightest case for every read-after-write hazard."""
    design = dict(FAST, h=4, w=5, c=4, lanes=4, max_prefix=1)
    _run("icarus" if _have("icarus") else "verilator", design, frames=8, real=0)


def test_serial_multipliers_are_bit_exact_at_two_beats_per_token():
    """serial_mul: the wide key products by shift-add; B = 2 gives them one cycle."""
    design = dict(FAST, h=5, w=6, c=8, lanes=4, max_prefix=1, serial_mul=1)
    _run("icarus" if _have("icarus") else "verilator", design, frames=6, real=0)


def _mul_cells(**kw):
    from amaranth.back import rtlil

    return rtlil.convert(CubistMerge(**kw), name="t").count("cell $mul ")


def test_serial_mul_leaves_only_the_per_beat_products_as_multipliers():
    # 4P per-beat products (two KeyFronts); per divider the 19-bit |d|^2 in 3 partial
    # products (a square shares its cross product) and na*nb in 4; 1 map multiply
    assert _mul_cells(h_max=6, w_max=6, c=16, lanes=2, unmerge=0) == 4 * 2 + 2 * (3 + 4) + 1
    assert _mul_cells(h_max=6, w_max=6, c=16, lanes=2, unmerge=0, serial_mul=1) == 4 * 2


@pytest.mark.slow
def test_14x14x64_meets_the_throughput_target():
    design = dict(h=14, w=14, c=64, lanes=4, width=8, frac_bits=16, max_prefix=4, unmerge=1)
    r = _run("verilator", design, frames=4, real_frames=1,
             bench=[[14, 14, 1, 1], [14, 14, 2, 2]], bench_frames=4)
    for run in r.metrics["throughput"]:
        assert run["cycles_ratio"] <= 1.10, run


@pytest.mark.slow
def test_shared_keys_are_bit_exact_with_one_frame_buffer_bank():
    """shared_keys: one key front and divider for both passes (IN and H-MERGE take turns),
    here with buffers=1 (the single-port frame-buffer shape) and serial products; the
    full testbench, unmerge included."""
    design = dict(FAST, buffers=1, serial_mul=1, shared_keys=1)
    r = _run("icarus" if _have("icarus") else "verilator", design, frames=6, real_frames=1,
             gap=0.25, stall=0.3)
    assert r.metrics["frames_checked"] == 8 and r.metrics["error_cases"] == 10


def test_shared_keys_at_one_beat_per_token():
    """C = P with shared keys: H and V beats alternate cycle by cycle, jobs back to back."""
    design = dict(FAST, h=4, w=5, c=4, lanes=4, max_prefix=1, shared_keys=1)
    _run("icarus" if _have("icarus") else "verilator", design, frames=8, real=0)


@pytest.mark.slow
def test_icebreaker_configuration_is_bit_exact_on_both_simulators(simulator):
    """The iCEBreaker's merge unit (fpga.designs.BOARD_DEFAULTS: 14x14x64, P=4, shared keys,
    one frame-buffer bank, serial products, area=1, no unmerge): a few frames under gaps and
    backpressure, at maximum r and at r = 0; on Verilator also its steady-state rate."""
    from fpga.designs import board_params
    from hw.designs import get

    design = {**get("cubist").defaults(), **board_params("icebreaker", "cubist")}
    assert design["shared_keys"] == 1 and design["buffers"] == 1 and design["area"] == 1
    cases = ["test_random_frames"]
    extra = {}
    if simulator == "verilator":
        cases.append("test_throughput")
        extra = dict(bench=[[14, 14, 1, 1]], bench_frames=3)
    r = simulate(design_from_params(**design), test_module="sim.tb.tb_cubist",
                 simulator=simulator, name="cubist", testcase=cases,
                 params={**design, "seed": 5, "frames": 2, "gap": 0.2, "stall": 0.2,
                         **extra})
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    assert r.metrics["frames_checked"] == 4
    if simulator == "verilator":
        # input at half rate (2 H*W*B cycles), then, with one frame-buffer bank, the
        # output (H'W'B) before the next frame can merge: about 2.9 at r = 1
        (run,) = r.metrics["throughput"]
        assert 2.5 <= run["cycles_ratio"] <= 3.1, run


@pytest.mark.slow
def test_area_configuration_is_bit_exact_on_both_simulators(simulator):
    """area=1 (serial rankers, no ECP5 pipeline registers before the merges, memories
    without read-during-write logic): the full testbench under random gaps and stalls,
    worst cases, real features, malformed frames each followed by a good one, unmerge;
    at B = 8 = W_max/2 + 4, one frame-buffer bank."""
    design = dict(FAST, c=32, buffers=1, serial_mul=1, shared_keys=1, area=1)
    r = _run(simulator, design, frames=3, gap=0.25, stall=0.3, real_frames=1)
    assert r.tests == 6
    m = r.metrics
    assert m["frames_checked"] == 5 and m["error_cases"] == 10
    assert m["three_way_merges"] > 0 and m["unmerge_frames_checked"] == 4


def test_area_configuration_at_the_smallest_beat_count_with_two_banks():
    """area=1 at the tightest key spacing it allows (B = max(H, W)//2 + 3: a ranker
    pass ends the cycle before the next key can come), both frame-buffer banks."""
    design = dict(FAST, h=6, w=7, c=6, lanes=1, max_prefix=1, serial_mul=1, shared_keys=1,
                  area=1)
    assert CubistMerge(h_max=6, w_max=7, c=6, lanes=1, shared_keys=1, area=1).beats == 6
    _run("icarus" if _have("icarus") else "verilator", design, frames=5, real=0,
         stall=0.3, gap=0.25)


def _rank_model(lines, k):
    """The rankers' decision per finished line: removed/dir bits of its candidates."""
    out = []
    for keys, r in lines:
        scores, ranks, dirs = [], [], []
        for n, key in enumerate(keys):
            last = n == len(keys) - 1
            if n % 2 == 0 and not last:
                pend = key
                continue
            right = n % 2 == 1 and key > pend
            score = key if right or n % 2 == 0 else pend
            kv = n >> 1
            cnt = sum(1 for s in scores if not score > s)
            ranks = [rk + (score > s) for rk, s in zip(ranks, scores)]
            scores.append(score)
            ranks.append(cnt)
            dirs.append(int(right))
            assert len(scores) == kv + 1
        out.append((sum(1 << j for j, rk in enumerate(ranks) if rk < r),
                    sum(d << j for j, d in enumerate(dirs))))
    return out


@pytest.mark.parametrize("k, seed", [(7, 1), (3, 2), (1, 3)])
def test_serial_ranker_matches_the_rank_rule_with_interleaved_contexts(k, seed):
    """SerialRanker (area=1's H-RANK and V-RANK) against the incremental-rank rule of the
    parallel rankers: lines of 2..2k+1 keys in four contexts, their keys interleaved
    (as V-RANK's columns are), keys K + 3 cycles apart, many ties (keys from a small
    set), every r in 0..k."""
    from hw.cubist.rank import SerialRanker

    rng = random.Random(seed)
    dut = SerialRanker(k=k, key_bits=6, ctx_bits=2, tag_bits=3)
    lines = {c: [] for c in range(4)}
    for c in range(4):
        for _ in range(3):
            n = rng.randint(2, 2 * k + 1)
            lines[c].append(([rng.randint(-4, 4) for _ in range(n - 1)], rng.randint(0, k)))
    # one key per ctx in turn, a line of each context at a time
    sched, pos = [], {c: [0, 0] for c in range(4)}
    while any(pos[c][0] < 3 for c in range(4)):
        for c in range(4):
            li, n = pos[c]
            if li == 3:
                continue
            keys, r = lines[c][li]
            sched.append((c, li, keys[n], n, n == len(keys) - 1, r))
            pos[c] = [li, n + 1] if n + 1 < len(keys) else [li + 1, 0]
    got = {c: [] for c in range(4)}

    async def bench(ctx):
        for c, li, key, n, last, r in sched:
            ctx.set(dut.valid, 1)
            ctx.set(dut.key, key)
            ctx.set(dut.n, n)
            ctx.set(dut.last, last)
            ctx.set(dut.thr, r)
            ctx.set(dut.ctx, c)
            ctx.set(dut.tag, li)
            for _ in range(k + 3):
                await ctx.tick()
                ctx.set(dut.valid, 0)
                if ctx.get(dut.dec_valid):
                    got[ctx.get(dut.dec_ctx)].append(
                        (ctx.get(dut.dec_tag), ctx.get(dut.dec_removed), ctx.get(dut.dec_dirs)))
        for _ in range(k + 3):
            await ctx.tick()
            if ctx.get(dut.dec_valid):
                got[ctx.get(dut.dec_ctx)].append(
                    (ctx.get(dut.dec_tag), ctx.get(dut.dec_removed), ctx.get(dut.dec_dirs)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    for c in range(4):
        exp = [(li, *dec) for li, dec in enumerate(_rank_model(lines[c], k))]
        assert got[c] == exp, (c, lines[c])


def _have(sim):
    from sim.runner import available_simulators

    return sim in available_simulators()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(h_max=1), r"h_max must be in 2\.\.64, not 1"),
    (dict(w_max=65), r"w_max must be in 2\.\.64, not 65"),
    (dict(c=0), r"c must be in 1\.\.1024, not 0"),
    (dict(lanes=3), r"lanes must be a power of two, not 3"),
    (dict(c=24, lanes=16), r"lanes must be a power of two dividing c=24, not 16"),
    (dict(width=12), r"width must be 8 or 16, not 12"),
    (dict(frac_bits=7), r"frac_bits must be in 8\.\.24, not 7"),
    (dict(max_prefix=17), r"max_prefix must be in 0\.\.16, not 17"),
    (dict(unmerge=2), r"unmerge must be 0 or 1, not 2"),
    (dict(buffers=3), r"buffers must be 1 or 2, not 3"),
    (dict(serial_mul=2), r"serial_mul must be 0 or 1, not 2"),
    (dict(c=4, lanes=4, serial_mul=1), r"serial_mul needs c/lanes >= 2 beats per token, not 1"),
    (dict(shared_keys=2), r"shared_keys must be 0 or 1, not 2"),
    (dict(area=2, shared_keys=1), r"area must be 0 or 1, not 2"),
    (dict(area=1), r"area=1 needs shared_keys=1"),
    (dict(h_max=14, w_max=8, c=32, lanes=4, shared_keys=1, area=1),
     r"area=1 needs c/lanes >= max\(h_max, w_max\)//2 \+ 3 = 10 beats per token \(one key "
     r"per ranker pass\), not 8"),
])
def test_bad_parameters_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CubistMerge(**kwargs)


def test_registry_builds_it_and_verilog_is_byte_identical():
    a = to_verilog(build("cubist", h=6, w=7, c=16, lanes=4, max_prefix=2), name="cubist")
    b = to_verilog(build("cubist", h=6, w=7, c=16, lanes=4, max_prefix=2), name="cubist")
    assert a == b
    assert "src =" not in a


def test_layouts_are_readable_from_the_signature():
    u = CubistMerge(h_max=14, w_max=14, c=64, lanes=4, unmerge=0)
    assert set(u.cfg.payload.shape().members) == {"h", "w", "r_h", "r_w", "prefix"}
    assert u.i.payload.shape().size == 4 * 8 + 2
    assert u.map.payload.shape()["index"].width == 8  # 196 grid positions
    assert not hasattr(u, "um_i")


def test_no_combinational_path_from_valid_to_ready():
    """Within a cycle, flipping an input stream's valid never changes its ready, while
    frames run through the unit (Amaranth's simulator)."""
    u = CubistMerge(h_max=4, w_max=4, c=4, lanes=4, max_prefix=1, unmerge=1)
    inputs = [u.cfg, u.i, u.um_cfg, u.um_i, u.um_map]
    outputs = [u.o, u.map, u.status, u.um_o]
    sim = Simulator(u)
    sim.add_clock(1e-6)
    checked = []

    async def bench(ctx):
        rng = random.Random(4)
        for out in outputs:
            ctx.set(out.ready, 1)
        ctx.set(u.cfg.payload.h, 3)
        ctx.set(u.cfg.payload.w, 4)
        ctx.set(u.cfg.payload.r_w, 1)
        ctx.set(u.cfg.payload.r_h, 1)
        beats = 0
        for _ in range(600):
            for s in inputs:
                ctx.set(s.valid, 0)
                r0 = ctx.get(s.ready)
                ctx.set(s.valid, 1)
                r1 = ctx.get(s.ready)
                assert r0 == r1, "ready follows valid combinationally"
                checked.append(r1)
            # then drive a plausible stream: config, then 12 tokens of one beat
            for s in inputs:
                ctx.set(s.valid, 0)
            ctx.set(u.cfg.valid, 1)
            ctx.set(u.i.valid, rng.random() < 0.8)
            ctx.set(u.i.payload.last_token, 1)
            ctx.set(u.i.payload.last, beats % 12 == 11)
            took = ctx.get(u.i.valid) and ctx.get(u.i.ready)
            await ctx.tick()
            beats += bool(took)
        assert beats > 24  # several frames went through

    sim.add_testbench(bench)
    sim.run()
    assert any(checked) and not all(checked)  # readies did change over time


@pytest.mark.parametrize("frac_bits, beats, serial, lean", [
    (16, 16, False, False), (11, 1, False, False), (16, 2, True, False), (8, 3, True, False),
    (16, 16, True, True), (16, 5, True, True), (13, 4, False, True)])
def test_key_divider_matches_the_key_formula(frac_bits, beats, serial, lean):
    """KeyDivider alone (Amaranth's simulator), jobs every B cycles from real token pairs:
    key = sign(d) * floor(d^2 * 2^F / (na * nb)), 0 for a zero norm; keys in job order.
    lean: one divider unit, fed straight from the shift-add registers."""
    from hw.cubist.keys import KeyDivider, norm_bits

    c, width = 8, 8
    nw = norm_bits(c, width)
    rng = random.Random(frac_bits * 100 + beats)
    jobs = []
    for n in range(40):
        a = [rng.randint(-128, 127) for _ in range(c)]
        b = [x if n % 7 == 0 else rng.randint(-128, 127) for x in a]  # some cos = 1
        if n % 11 == 3:
            b = [0] * c
        if n % 5 == 1:
            b = [-x for x in a]  # cos = -1
        jobs.append((sum(x * y for x, y in zip(a, b)), sum(x * x for x in a),
                     sum(y * y for y in b)))

    def key(d, na, nb):
        return 0 if na * nb == 0 else (1 if d >= 0 else -1) * ((d * d << frac_bits) // (na * nb))

    dut = KeyDivider(dw=nw + 1, nw=nw, frac_bits=frac_bits, beats=beats, serial=serial,
                     lean=lean)
    assert dut.units == 1 if lean else dut.units >= 1
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def drive(ctx):
        for d, na, nb in jobs:
            ctx.set(dut.valid, 1)
            ctx.set(dut.d, d)
            ctx.set(dut.na, na)
            ctx.set(dut.nb, nb)
            await ctx.tick()
            ctx.set(dut.valid, 0)
            await ctx.tick().repeat(beats - 1) if beats > 1 else None

    async def collect(ctx):
        for _ in range(len(jobs) * beats + 3 * dut.latency + 100):
            await ctx.tick()
            if ctx.get(dut.key_valid):
                got.append(ctx.get(dut.key))

    sim.add_testbench(drive)
    sim.add_testbench(collect)
    sim.run()
    assert got == [key(*j) for j in jobs]


def test_mm_lanes_is_max_magnitude_with_ties_to_the_first_on_every_8_bit_pair():
    from amaranth.hdl import Module, Signal

    from hw.cubist.unit import mm_lanes

    a, b, o = Signal(8), Signal(8), Signal(8)
    m = Module()
    m.d.comb += o.eq(mm_lanes(a, b, 1, 8))
    sim = Simulator(m)
    wrong = []

    async def bench(ctx):
        for x in range(-128, 128):
            for y in range(-128, 128):
                ctx.set(a, x & 255)
                ctx.set(b, y & 255)
                got = ctx.get(o)
                if (got - 256 if got > 127 else got) != (y if abs(y) > abs(x) else x):
                    wrong.append((x, y))

    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]


def test_mag_flags_are_both_strict_magnitude_compares_on_every_8_bit_pair():
    """area=1's H-MERGE compares once (mag_flags) and picks later (pick_lanes); mm_lanes
    is built on the first flag. Both flags against |.| on the integers, and a pick on
    each, ties to the first operand."""
    from amaranth.hdl import Module, Signal

    from hw.cubist.unit import mag_flags, pick_lanes

    x, t = Signal(8), Signal(8)
    tx, xt = mag_flags(x, t, 1, 8)
    f_tx, f_xt, p_tx = Signal(), Signal(), Signal(8)
    m = Module()
    m.d.comb += [f_tx.eq(tx), f_xt.eq(xt), p_tx.eq(pick_lanes(xt, t, x, 1, 8))]
    sim = Simulator(m)
    wrong = []

    async def bench(ctx):
        for a in range(-128, 128):
            for b in range(-128, 128):
                ctx.set(x, a & 255)
                ctx.set(t, b & 255)
                want = (int(abs(b) > abs(a)), int(abs(a) > abs(b)),
                        (a if abs(a) > abs(b) else b) & 255)
                if (ctx.get(f_tx), ctx.get(f_xt), ctx.get(p_tx)) != want:
                    wrong.append((a, b))

    sim.add_testbench(bench)
    sim.run()
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("beats, serial, c, lean", [
    (16, True, 64, False), (16, True, 8, False), (4, False, 8, False), (1, False, 8, False),
    (16, True, 64, True), (6, True, 8, True)])
def test_queued_key_divider_keeps_order_and_tags_of_two_interleaved_streams(beats, serial, c,
                                                                             lean):
    """KeyDivider(queue=True), as shared by both passes: two tagged job streams, each at
    most one job per 2B cycles, arriving at unrelated times (often back to back); every
    key is right and comes back in job order with its job's tag. (C = 64, B = 16: the
    serial products consume more multiplier bits than their operands have.)"""
    from hw.cubist.keys import KeyDivider, norm_bits

    width, frac_bits = 8, 16
    nw = norm_bits(c, width)
    rng = random.Random(beats + c)
    times = {}
    for tag in (0, 1):
        t = rng.randint(0, 3)
        for _ in range(25):
            while t in times:  # one front: at most one job a cycle
                t += 1
            times[t] = tag
            t += 2 * beats + rng.choice([0, 0, 1, beats])
    jobs = []
    for n, t in enumerate(sorted(times)):
        a = [rng.randint(-128, 127) for _ in range(c)]
        b = [rng.randint(-128, 127) for _ in range(c)]
        if n % 9 == 4:  # the extremes: d = na = nb = C * 128^2
            a = b = [-128] * c
        jobs.append((t, times[t], sum(x * y for x, y in zip(a, b)), sum(x * x for x in a),
                     sum(y * y for y in b)))

    def key(d, na, nb):
        return (1 if d >= 0 else -1) * ((d * d << frac_bits) // (na * nb))

    dut = KeyDivider(dw=nw + 1, nw=nw, frac_bits=frac_bits, beats=beats, serial=serial,
                     queue=True, lean=lean)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []
    end = jobs[-1][0] + dut.latency + 2 * beats + 10

    async def drive(ctx):
        now = 0
        for t, tag, d, na, nb in jobs:
            await ctx.tick().repeat(t - now) if t > now else None
            now = t
            ctx.set(dut.valid, 1)
            ctx.set(dut.tag, tag)
            ctx.set(dut.d, d)
            ctx.set(dut.na, na)
            ctx.set(dut.nb, nb)
            await ctx.tick()
            now += 1
            ctx.set(dut.valid, 0)

    async def collect(ctx):
        for _ in range(end):
            await ctx.tick()
            if ctx.get(dut.key_valid):
                got.append((ctx.get(dut.key_tag), ctx.get(dut.key)))

    sim.add_testbench(drive)
    sim.add_testbench(collect)
    sim.run()
    assert sum(1 for j in jobs[1:] if j[0] - jobs[jobs.index(j) - 1][0] == 1) > 0
    assert got == [(tag, key(d, na, nb)) for _, tag, d, na, nb in jobs]


def _key_front_jobs(product_regs, tokens, p, width):
    """KeyFront(tokens=1) fed ``tokens`` (lists of P-lane beats) back to back: the jobs
    ``(cycle, d, na, nb)`` it emits."""
    from hw.cubist.keys import KeyFront

    beats = len(tokens[0])
    c = beats * p
    dut = KeyFront(p=p, width=width, beats=beats, tokens=1, c=c, product_regs=product_regs)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def drive(ctx):
        for n, tok in enumerate(tokens):
            for k, beat in enumerate(tok):
                ctx.set(dut.valid, 1)
                ctx.set(dut.data, sum((v & ((1 << width) - 1)) << (i * width)
                                      for i, v in enumerate(beat)))
                ctx.set(dut.c, k)
                ctx.set(dut.end, k == beats - 1)
                ctx.set(dut.has_prev, n != 0)
                await ctx.tick()
        ctx.set(dut.valid, 0)

    async def collect(ctx):
        for cycle in range(len(tokens) * beats + 40):
            await ctx.tick()
            if ctx.get(dut.job_valid):
                got.append((cycle, ctx.get(dut.job_d), ctx.get(dut.job_na), ctx.get(dut.job_nb)))

    sim.add_testbench(drive)
    sim.add_testbench(collect)
    sim.run()
    return got


def test_key_front_product_registers_only_delay_the_jobs():
    """product_regs=2 (ECP5 timing, the default), 1 (shared keys) and 0 (area=1): the same
    jobs d = <prev, new>, na = |prev|^2, nb = |new|^2, each register one cycle later."""
    p, width, beats = 4, 8, 3
    rng = random.Random(5)
    tokens = [[[rng.randint(-128, 127) for _ in range(p)] for _ in range(beats)]
              for _ in range(6)]
    flat = [sum(t, []) for t in tokens]
    want = [(sum(x * y for x, y in zip(a, b)), sum(x * x for x in a), sum(y * y for y in b))
            for a, b in zip(flat, flat[1:])]
    zero, one = _key_front_jobs(0, tokens, p, width), _key_front_jobs(1, tokens, p, width)
    two = _key_front_jobs(2, tokens, p, width)
    assert [j[1:] for j in zero] == want
    assert [j[1:] for j in one] == want
    assert [j[1:] for j in two] == want
    assert [j[0] + 1 for j in zero] == [j[0] for j in one]
    assert [j[0] + 1 for j in one] == [j[0] for j in two]


def test_lean_key_front_keeps_two_interleaved_streams_apart():
    """KeyFront as area=1 builds it (ways=2, no operand register, memories without
    read-during-write logic, the new beat written a cycle late): two token streams on
    alternate cycles, with gaps, each its own tok slot; every job is that stream's
    d = <prev, new>, na = |prev|^2, nb = |new|^2, tagged with its way."""
    from hw.cubist.keys import KeyFront

    p, width, beats = 4, 8, 3
    rng = random.Random(7)
    streams = [[[[rng.randint(-128, 127) for _ in range(p)] for _ in range(beats)]
                for _ in range(7)] for _ in range(2)]
    dut = KeyFront(p=p, width=width, beats=beats, tokens=2, c=beats * p, ways=2,
                   product_regs=1, operand_regs=False, mem_attrs={"no_rw_check": 1})
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = {0: [], 1: []}
    beats_of = [[(n, k, b) for n, t in enumerate(s) for k, b in enumerate(t)] for s in streams]

    async def drive(ctx):
        cycle, pos = 0, [0, 0]
        while pos[0] < len(beats_of[0]) or pos[1] < len(beats_of[1]):
            way = cycle % 2
            ctx.set(dut.valid, 0)
            if pos[way] < len(beats_of[way]) and rng.random() < 0.8:
                n, k, beat = beats_of[way][pos[way]]
                pos[way] += 1
                ctx.set(dut.valid, 1)
                ctx.set(dut.way, way)
                ctx.set(dut.tok, way)
                ctx.set(dut.data, sum((v & 255) << (i * width) for i, v in enumerate(beat)))
                ctx.set(dut.c, k)
                ctx.set(dut.end, k == beats - 1)
                ctx.set(dut.has_prev, n != 0)
            await ctx.tick()
            cycle += 1
        ctx.set(dut.valid, 0)

    async def collect(ctx):
        for _ in range(200):
            await ctx.tick()
            if ctx.get(dut.job_valid):
                got[ctx.get(dut.job_way)].append(
                    (ctx.get(dut.job_d), ctx.get(dut.job_na), ctx.get(dut.job_nb)))

    sim.add_testbench(drive)
    sim.add_testbench(collect)
    sim.run()
    for way in (0, 1):
        flat = [sum(t, []) for t in streams[way]]
        assert got[way] == [(sum(x * y for x, y in zip(a, b)), sum(x * x for x in a),
                             sum(y * y for y in b)) for a, b in zip(flat, flat[1:])]


def test_key_front_refuses_a_bad_product_register_count():
    from hw.cubist.keys import KeyFront

    with pytest.raises(ValueError, match=r"product_regs must be 0, 1 or 2, not 3"):
        KeyFront(p=4, width=8, beats=2, tokens=1, c=8, product_regs=3)
