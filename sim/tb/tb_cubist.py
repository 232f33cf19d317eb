"""Testbench of the CubistMerge merge unit (``hw.cubist``), bit-exact against
``golden.cubist_fixed``.

Parameters (``sim.tbutil.params()``): the design's elaboration parameters (``h``, ``w``,
``c``, ``lanes``, ``width``, ``frac_bits``, ``max_prefix``, ``unmerge``, ``buffers``) and
``seed``, ``frames`` (random frames in ``test_random_frames``), ``gap`` / ``stall``
(input pause / output backpressure probabilities), ``burst``, ``bench`` (a list of
``[H, W, r_h, r_w]`` for ``test_throughput``; default: the maximum size at r = 1),
``bench_frames``.

Tests: random frames and configurations under gaps and backpressure, worst cases (ties,
extremes, three-way merges), real ViT features, bad configurations and malformed
frames, the unmerge unit, and steady-state throughput.
"""

from __future__ import annotations

import os
import random

import cocotb
import numpy as np
import torch
from cocotb.triggers import ClockCycles, FallingEdge, ReadOnly

from golden.cubist_fixed import (
    merge_1d_fixed,
    merge_2d_fixed,
    quantize,
    random_frames,
    unmerge_fixed,
)
from hw.cubist import ERR_CONFIG, ERR_LAST_TOKEN, ERR_LONG, ERR_OK, ERR_SHORT, CubistMerge
from sim.streams import (
    NoPauses,
    RandomPauses,
    StreamSink,
    StreamSource,
    StructCodec,
    pack_lanes,
    unpack_lanes,
)
from sim.tbutil import cycle_counter, params, report_metric, start_clock_and_reset

KINDS = ("random", "smooth", "equal", "zero", "extreme", "few")


class Env:
    """The DUT with its stream drivers, codecs taken from the component's layouts."""

    def __init__(self, dut, p: dict, *, gap: float = 0.0, stall: float = 0.0):
        self.p = p
        self.unit = CubistMerge(h_max=p["h"], w_max=p["w"], c=p["c"], lanes=p["lanes"],
                                width=p["width"], frac_bits=p["frac_bits"],
                                max_prefix=p["max_prefix"], unmerge=p["unmerge"],
                                buffers=p.get("buffers", 2),
                                serial_mul=p.get("serial_mul", 0),
                                shared_keys=p.get("shared_keys", 0))
        self.width, self.lanes, self.c = p["width"], p["lanes"], p["c"]
        self.beats = self.c // self.lanes
        seed, burst = p.get("seed", 1), p.get("burst", 4)

        def pauses(prob, s):
            return RandomPauses(prob, s, burst) if prob else NoPauses()

        def codec(port):
            return StructCodec.from_layout(port.payload.shape())

        u = self.unit
        clk = dut.clk
        self.tok_codec = codec(u.i)
        self.cfg = StreamSource(dut, "cfg", clk, codec=codec(u.cfg))
        self.i = StreamSource(dut, "i", clk, codec=self.tok_codec, pauses=pauses(gap, seed))
        self.o = StreamSink(dut, "o", clk, codec=self.tok_codec, pauses=pauses(stall, seed + 1))
        self.map = StreamSink(dut, "map", clk, codec=codec(u.map),
                              pauses=pauses(stall, seed + 2))
        self.status = StreamSink(dut, "status", clk, codec=codec(u.status),
                                 pauses=pauses(stall, seed + 3))
        if u.has_unmerge:
            self.um_cfg = StreamSource(dut, "um_cfg", clk, codec=codec(u.um_cfg))
            self.um_i = StreamSource(dut, "um_i", clk, codec=self.tok_codec,
                                     pauses=pauses(gap, seed + 4))
            self.um_map = StreamSource(dut, "um_map", clk, codec=codec(u.um_map),
                                       pauses=pauses(gap, seed + 5))
            self.um_o = StreamSink(dut, "um_o", clk, codec=self.tok_codec,
                                   pauses=pauses(stall, seed + 6))

    # -- driving ---------------------------------------------------------------------
    def beats_of(self, tokens: np.ndarray) -> list[dict]:
        """Token beats of ``tokens [n, C]``: lanes packed, flags set."""
        out = []
        for t in tokens:
            for b in range(self.beats):
                lanes = t[b * self.lanes:(b + 1) * self.lanes]
                out.append({"data": pack_lanes(lanes, self.width), "last_token": 0, "last": 0})
            out[-1]["last_token"] = 1
        if out:
            out[-1]["last"] = 1
        return out

    def send_frame(self, cfg: dict, tokens: np.ndarray, beats: list[dict] | None = None):
        self.cfg.send(cfg)
        self.i.send_all(beats if beats is not None else self.beats_of(tokens))

    async def recv_tokens(self, sink: StreamSink, count: int | None = None) -> np.ndarray:
        """Beats until ``last`` (checking the flags), as tokens ``[n, C]``."""
        toks, cur = [], []
        while True:
            beat = await sink.recv()
            cur.extend(unpack_lanes(beat["data"], self.width, self.lanes))
            if len(cur) % self.c == 0:
                assert beat["last_token"] == 1, f"{sink.name}: last_token missing"
                toks.append(cur)
                cur = []
            else:
                assert beat["last_token"] == 0, f"{sink.name}: last_token misplaced"
            if beat["last"]:
                assert not cur, f"{sink.name}: last in the middle of a token"
                break
        if count is not None:
            assert len(toks) == count, f"{sink.name}: {len(toks)} tokens, expected {count}"
        return np.asarray(toks, dtype=np.int64).reshape(-1, self.c)

    async def recv_map(self) -> np.ndarray:
        out = []
        while True:
            e = await self.map.recv()
            out.append(e["index"])
            if e["last"]:
                return np.asarray(out, dtype=np.int64)


def _frame(rng: np.random.Generator, kind: str, hw, c: int, prefix: int, width: int,
           seed: int) -> np.ndarray:
    h, w = hw
    n = prefix + h * w
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    if kind == "random":
        return rng.integers(lo, hi + 1, size=(n, c))
    if kind == "smooth":
        x = random_frames("smooth", 1, hw, c, prefix=prefix, seed=seed)[0]
        return quantize(x, width)[0].numpy()
    if kind == "equal":
        return np.tile(rng.integers(lo, hi + 1, size=(1, c)), (n, 1))
    if kind == "zero":
        return np.zeros((n, c), dtype=np.int64)
    if kind == "extreme":
        return rng.choice(np.array([lo, hi, -hi, 0]), size=(n, c))
    if kind == "few":  # three distinct tokens: many ties, many three-way merges
        base = rng.integers(lo, hi + 1, size=(3, c))
        return base[rng.integers(0, 3, size=n)]
    raise ValueError(kind)


def _expected(env: Env, cfg: dict, tokens: np.ndarray):
    p = env.p
    return merge_2d_fixed(tokens, (cfg["h"], cfg["w"]), (cfg["r_h"], cfg["r_w"]),
                          prefix=cfg["prefix"], width=p["width"], frac_bits=p["frac_bits"])


def _three_way(cfg, tokens, p) -> int:
    """Three-way merges (a token that both neighbours merged into) in a frame, counted
    on the golden model's two 1-D passes."""
    h, w, c = cfg["h"], cfg["w"], tokens.shape[-1]
    grid = torch.as_tensor(tokens[cfg["prefix"]:]).reshape(h, w, c)
    kw = dict(width=p["width"], frac_bits=p["frac_bits"])
    rows = merge_1d_fixed(grid, cfg["r_w"], **kw)
    cols = merge_1d_fixed(rows.merged.transpose(0, 1), cfg["r_h"], **kw)
    n = 0
    for dest in (rows.dest_index, cols.dest_index):
        for line in dest:
            n += int((torch.bincount(line) == 3).sum())
    return n


async def _check_frames(env: Env, frames: list[tuple[dict, np.ndarray]], *, label: str):
    """Send frames back to back and check every output against the golden model."""
    for cfg, tok in frames:
        env.send_frame(cfg, tok)
    for n, (cfg, tok) in enumerate(frames):
        exp_tok, exp_map = _expected(env, cfg, tok)
        got = await env.recv_tokens(env.o, exp_tok.shape[0])
        bad = np.argwhere(got != exp_tok.numpy())
        assert bad.size == 0, (f"{label} frame {n} {cfg}: token mismatch at "
                               f"(token, channel) {bad[0].tolist()}: got {got[tuple(bad[0])]}, "
                               f"expected {int(exp_tok[tuple(bad[0])])}")
        got_map = await env.recv_map()
        assert np.array_equal(got_map, exp_map.numpy()), (
            f"{label} frame {n} {cfg}: map {got_map.tolist()} != {exp_map.tolist()}")
        st = await env.status.recv()
        assert st["error"] == ERR_OK, f"{label} frame {n}: status error {st['error']}"


def _random_cfg(rng: random.Random, p: dict) -> dict:
    h = rng.randint(2, p["h"])
    w = rng.randint(2, p["w"])
    pick = rng.random()
    if pick < 0.2:
        r_h, r_w = 0, 0
    elif pick < 0.45:
        r_h, r_w = h // 2, w // 2
    else:
        r_h, r_w = rng.randint(0, h // 2), rng.randint(0, w // 2)
    return {"h": h, "w": w, "r_h": r_h, "r_w": r_w,
            "prefix": rng.randint(0, p["max_prefix"])}


def _finish(env: Env):
    for s in (env.o, env.map, env.status):
        assert not s.items, f"{s.name}: {len(s.items)} unexpected items"
        assert s.violations == [], s.violations[:3]


@cocotb.test()
async def test_random_frames(dut):
    """Random sizes, r (0 .. max), prefixes and kinds, back to back, gaps and backpressure."""
    p = params()
    env = Env(dut, p, gap=p.get("gap", 0.2), stall=p.get("stall", 0.2))
    await start_clock_and_reset(dut)
    rng, nrng = random.Random(p.get("seed", 1)), np.random.default_rng(p.get("seed", 1))
    frames = []
    for n in range(p.get("frames", 12)):
        cfg = _random_cfg(rng, p)
        kind = KINDS[n % len(KINDS)]
        frames.append((cfg, _frame(nrng, kind, (cfg["h"], cfg["w"]), p["c"], cfg["prefix"],
                                   p["width"], seed=n)))
    # the largest frame at maximum r, and one at r = 0
    big = {"h": p["h"], "w": p["w"], "r_h": p["h"] // 2, "r_w": p["w"] // 2,
           "prefix": p["max_prefix"]}
    frames.append((big, _frame(nrng, "random", (p["h"], p["w"]), p["c"], big["prefix"],
                               p["width"], 0)))
    frames.append(({**big, "r_h": 0, "r_w": 0}, _frame(nrng, "few", (p["h"], p["w"]), p["c"],
                                                        big["prefix"], p["width"], 0)))
    await _check_frames(env, frames, label="random")
    await ClockCycles(dut.clk, 20)
    _finish(env)
    report_metric("frames_checked", len(frames))
    report_metric("three_way_merges", sum(_three_way(c, t, p) for c, t in frames))


@cocotb.test()
async def test_worst_cases(dut):
    """Ties everywhere, three-way merges, extremes and all-zero frames at maximum r."""
    p = params()
    env = Env(dut, p, stall=p.get("stall", 0.2))
    await start_clock_and_reset(dut)
    nrng = np.random.default_rng(p.get("seed", 1) + 7)
    h, w = p["h"], p["w"]
    frames = []
    for kind in ("few", "equal", "zero", "extreme", "few"):
        for r in ((h // 2, w // 2), (1, 1)):
            cfg = {"h": h, "w": w, "r_h": r[0], "r_w": r[1], "prefix": 0}
            frames.append((cfg, _frame(nrng, kind, (h, w), p["c"], 0, p["width"], 3)))
    # odd sizes
    for hw in ((3, 5), (2, 2), (max(2, h - 1), max(2, w - 1))):
        cfg = {"h": hw[0], "w": hw[1], "r_h": hw[0] // 2, "r_w": hw[1] // 2, "prefix": 1
               if p["max_prefix"] else 0}
        frames.append((cfg, _frame(nrng, "few", hw, p["c"], cfg["prefix"], p["width"], 4)))
    three = sum(_three_way(c, t, p) for c, t in frames)
    assert three > 0, "the worst-case frames should contain three-way merges"
    await _check_frames(env, frames, label="worst")
    await ClockCycles(dut.clk, 20)
    _finish(env)
    report_metric("worst_case_three_way_merges", three)


@cocotb.test()
async def test_errors_then_recovery(dut):
    """Each malformed frame gets its error code and no output; the next frame is right."""
    p = params()
    env = Env(dut, p, gap=0.1, stall=0.1)
    await start_clock_and_reset(dut)
    nrng = np.random.default_rng(5)
    h, w = min(p["h"], 4), min(p["w"], 5)
    good = {"h": h, "w": w, "r_h": 1, "r_w": 1, "prefix": 0}
    tok = _frame(nrng, "random", (h, w), p["c"], 0, p["width"], 1)
    beats = env.beats_of(tok)
    bad_cfgs = [{**good, "h": p["h"] + 1}, {**good, "w": p["w"] + 1}, {**good, "h": 1},
                {**good, "w": 1}, {**good, "r_w": w // 2 + 1}, {**good, "r_h": h // 2 + 1},
                {**good, "prefix": p["max_prefix"] + 1}]
    cases = [(c, beats, ERR_CONFIG) for c in bad_cfgs]
    short = [dict(b) for b in beats[:len(beats) // 2]]
    short[-1]["last"] = 1
    long_ = [dict(b) for b in beats] + [dict(b) for b in beats[:3]]
    long_[len(beats) - 1]["last"] = 0
    long_[-1]["last"] = 1
    lt = [dict(b) for b in beats]
    lt[0]["last_token"] ^= 1
    cases += [(good, short, ERR_SHORT), (good, long_, ERR_LONG), (good, lt, ERR_LAST_TOKEN)]
    for cfg, bs, code in cases:
        env.send_frame(cfg, None, bs)
        env.send_frame(good, tok)
        st = await env.status.recv()
        assert st["error"] == code, f"{cfg}: error {st['error']}, expected {code}"
        st2 = await env.status.recv()
        assert st2["error"] == ERR_OK
        exp_tok, exp_map = _expected(env, good, tok)
        got = await env.recv_tokens(env.o, exp_tok.shape[0])
        assert np.array_equal(got, exp_tok.numpy()), f"frame after error {code} is wrong"
        assert np.array_equal(await env.recv_map(), exp_map.numpy())
        assert st2["frame"] == st["frame"] + 1
    await ClockCycles(dut.clk, 50)
    _finish(env)
    report_metric("error_cases", len(cases))


@cocotb.test()
async def test_unmerge(dut):
    """The unmerge unit restores the grid exactly like ``unmerge_fixed`` (no prefix)."""
    p = params()
    env = Env(dut, p, gap=p.get("gap", 0.2), stall=p.get("stall", 0.2))
    await start_clock_and_reset(dut)
    if not env.unit.has_unmerge:
        return
    rng, nrng = random.Random(p.get("seed", 1) + 3), np.random.default_rng(3)
    count = 0
    for n in range(4):
        cfg = _random_cfg(rng, {**p, "max_prefix": 0})
        tok = _frame(nrng, KINDS[n % 3], (cfg["h"], cfg["w"]), p["c"], 0, p["width"], n)
        merged, mp = _expected(env, cfg, tok)
        env.um_cfg.send({k: cfg[k] for k in ("h", "w", "r_h", "r_w")})
        env.um_i.send_all(env.beats_of(merged.numpy()))
        entries = [{"index": int(v), "last": 0} for v in mp]
        entries[-1]["last"] = 1
        env.um_map.send_all(entries)
        exp = unmerge_fixed(merged, mp).numpy()
        got = await env.recv_tokens(env.um_o, exp.shape[0])
        assert np.array_equal(got, exp), f"unmerge frame {n} {cfg} differs"
        count += 1
    report_metric("unmerge_frames_checked", count)


@cocotb.test()
async def test_real_features(dut):
    """Features of a tiny ViT trained on digits (golden.vit), quantized, through the RTL."""
    p = params()
    if not p.get("real", 1):
        return
    from golden.vit import real_feature_frames

    feats = real_feature_frames(p.get("real_frames", 2), seed=0,
                                cache_dir=os.environ.get("PROCUBE_CACHE_DIR", "out/cache"))
    x = feats.frames if hasattr(feats, "frames") else feats[0]
    hw = tuple(feats.hw) if hasattr(feats, "hw") else (8, 8)
    prefix = int(feats.prefix) if hasattr(feats, "prefix") else 1
    x = torch.as_tensor(x)
    assert hw[0] <= p["h"] and hw[1] <= p["w"], "real features need an 8x8 grid"
    prefix = min(prefix, p["max_prefix"])
    ch = p["c"]
    if x.shape[-1] < ch:
        x = torch.nn.functional.pad(x, (0, ch - x.shape[-1]))
    x = x[:, x.shape[1] - hw[0] * hw[1] - prefix:, :ch]
    env = Env(dut, p)
    await start_clock_and_reset(dut)
    frames = []
    for n in range(x.shape[0]):
        ints = quantize(x[n], p["width"])[0].numpy()
        for r in ((1, 1), (2, 2)):
            frames.append(({"h": hw[0], "w": hw[1], "r_h": r[0], "r_w": r[1],
                            "prefix": prefix}, ints))
    await _check_frames(env, frames, label="real")
    report_metric("real_frames_checked", len(frames))


@cocotb.test()
async def test_throughput(dut):
    """Steady state: frames back to back, no gaps or stalls; cycles per frame, latency."""
    p = params()
    env = Env(dut, p)
    await start_clock_and_reset(dut)
    nrng = np.random.default_rng(11)
    runs = p.get("bench") or [[p["h"], p["w"], 1, 1]]
    nf = p.get("bench_frames", 4)
    results = []
    for h, w, r_h, r_w in runs:
        cfg = {"h": h, "w": w, "r_h": r_h, "r_w": r_w, "prefix": 0}
        frames = [(cfg, _frame(nrng, "random", (h, w), p["c"], 0, p["width"], n))
                  for n in range(nf)]
        stamps: list[int] = []
        first_in: list[int] = []
        first_out: list[int] = []
        cycles = cycle_counter(dut.clk)

        async def watch(stamps, first_in, first_out, cycles):
            seen_in = seen_out = False
            while len(stamps) < nf:
                await FallingEdge(dut.clk)
                await ReadOnly()
                if not seen_in and int(dut.i__valid.value) and int(dut.i__ready.value):
                    first_in.append(cycles.count)
                    seen_in = True
                if int(dut.o__valid.value) and int(dut.o__ready.value):
                    if not seen_out:
                        first_out.append(cycles.count)
                        seen_out = True
                    word = dut.o__payload.value.to_unsigned()
                    if env.tok_codec.decode(word)["last"]:
                        stamps.append(cycles.count)

        task = cocotb.start_soon(watch(stamps, first_in, first_out, cycles))
        await _check_frames(env, frames, label=f"bench {h}x{w} r=({r_h},{r_w})")
        await task
        per = (stamps[-1] - stamps[1]) / (nf - 2) if nf > 2 else stamps[-1] - stamps[0]
        bound = h * w * env.beats
        results.append({"config": [h, w, r_h, r_w], "cycles_per_frame": per,
                        "input_bound_cycles": bound, "cycles_ratio": per / bound,
                        "latency": first_out[0] - first_in[0]})
    report_metric("throughput", results)
    report_metric("cycles_per_frame", results[0]["cycles_per_frame"])
    report_metric("cycles_ratio", round(results[0]["cycles_ratio"], 4))
    report_metric("latency", results[0]["latency"])
