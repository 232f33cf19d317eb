"""Procrustes on a board: fixed-point training steps with every GEMM and every weight
update run by the array through the UART link, checked against ``golden.procrustes_ref``.

The workload is :class:`golden.procrustes_ref.FixedMLP` on sklearn's bundled digits (the
8×8 images average-pooled to ``sizes[0]`` = 64, 16 or 4 features; labels folded to
``sizes[-1]`` classes): the board model's accelerator is :class:`BoardAccel` (forward,
backward, weight gradient and update on the board), and a second model with the golden
accelerator runs the same steps beside it. Every tensor crossing the host/accelerator
boundary (forward outputs, backward outputs, weight gradients, the updated weights of each
parameter, the threshold after each update and the tracked count) is compared bit for bit.

Command order matters: the link's input buffer is shared by ``cmd`` and ``din``, so the
host sends each command's data words right behind it (:meth:`BoardProcrustes.execute`),
and drains ``resp``/``dout`` whenever the board stops granting credit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .apps import RunReport

__all__ = ["BoardAccel", "BoardProcrustes", "ProcrustesReport", "procrustes_steps"]


def _pack(values, bits: int) -> int:
    word, mask = 0, (1 << bits) - 1
    for n, v in enumerate(values):
        word |= (int(v) & mask) << (n * bits)
    return word


def _unpack(word: int, bits: int, count: int) -> list[int]:
    out, mask, half = [], (1 << bits) - 1, 1 << (bits - 1)
    for n in range(count):
        v = (word >> (n * bits)) & mask
        out.append(v - (1 << bits) if v & half else v)
    return out


class BoardError(RuntimeError):
    """The array refused a command (its response carried an error code)."""


@dataclass
class ProcrustesReport(RunReport):
    accel_cycles: dict = field(default_factory=dict)  # array cycles per command, summed
    losses: list = field(default_factory=list)

    def lines(self) -> list[str]:
        out = super().lines()
        phases = ", ".join(f"{k} {v}" for k, v in self.accel_cycles.items())
        out.insert(3, f"  array cycles (resp.cycles, summed per command): {phases}")
        out.insert(1, "  losses: " + ", ".join(f"{v:.4f}" for v in self.losses))
        return out


class BoardProcrustes:
    """The Procrustes array behind a :class:`fpga.host.Board`: buffer images and phases.

    The host side of ``sim/tb/tb_procrustes_host.py`` over the UART link: the same
    buffer layouts and command sequences, each phase sent as one ordered batch.
    """

    def __init__(self, board):
        from hw.procrustes import Config

        self.board = board
        p = board.info["params"]
        self.cfg = Config(**p)
        self.cycles: dict[str, int] = {}
        self.tracked = 0
        self.commands = 0

    # ---- transport ---------------------------------------------------------------
    def execute(self, program: list[tuple[dict, list[int], int]]) -> list[tuple[dict, list]]:
        """Run ``(command, din words, dout words expected)`` in order; per command its
        response and its ``dout`` words. Raises :class:`BoardError` on an error code."""
        from hw.procrustes import Op

        b = self.board
        ccod, dcod = b.codecs["cmd"], b.codecs["din"]
        rcod, ocod = b.codecs["resp"], b.codecs["dout"]
        segs: list[list] = []
        for cmd, words, _ in program:
            for name, data in (("cmd", ccod.encode(cmd)),
                               ("din", dcod.encode_all({"data": w} for w in words))):
                if not data:
                    continue
                if segs and segs[-1][0] == name:
                    segs[-1][1] += data
                else:
                    segs.append([name, bytearray(data)])
        expect = {"resp": len(program) * rcod.nbytes,
                  "dout": sum(n for _, _, n in program) * ocod.nbytes}
        got = b.transfer(segs, expect, ordered=True)
        resps = rcod.decode_all(got["resp"])
        douts = [w["data"] for w in ocod.decode_all(got["dout"])]
        out, pos = [], 0
        for (cmd, _, n), r in zip(program, resps):
            name = Op(cmd["op"]).name
            if r["op"] != cmd["op"]:
                raise BoardError(f"response for op {r['op']} to {name}")
            if r["err"]:
                raise BoardError(f"{name} failed with error {r['err']} "
                                 f"(m={cmd.get('m', 0)} k={cmd.get('k', 0)} "
                                 f"n={cmd.get('n', 0)} count={cmd.get('count', 0)})")
            self.cycles[name] = self.cycles.get(name, 0) + r["cycles"]
            out.append((r, douts[pos:pos + n]))
            pos += n
        self.commands += len(program)
        return out

    # ---- command builders ----------------------------------------------------------
    @staticmethod
    def _cmd(op, **fields) -> dict:
        return {"op": int(op), **{k: int(v) for k, v in fields.items()}}

    def _load_weights(self, bs) -> list:
        from hw.procrustes import Buf, Op

        c = self.cfg
        M, K = bs.shape
        words = [int(mk) | (int(p) << c.nb) for mk, p in zip(bs.masks, bs.ptr[:-1])]
        prog = [(self._cmd(Op.LOAD, sel=Buf.BLOCKS, m=M, k=K, addr=0), words, 0)]
        if bs.nnz:
            vals = [int(v) & ((1 << c.data_bits) - 1) for v in bs.values]
            prog.append((self._cmd(Op.LOAD, sel=Buf.VALUES, addr=0, count=len(vals)), vals, 0))
        return prog

    def _load(self, sel, words, **fields) -> tuple:
        from hw.procrustes import Op

        return (self._cmd(Op.LOAD, sel=sel, addr=0, count=len(words), **fields), words, 0)

    def _unload_y(self, r: int, count: int) -> tuple:
        from hw.procrustes import Buf, Op

        return (self._cmd(Op.UNLOAD, sel=Buf.Y, arg=r, addr=0, count=count), [], count)

    def _encode(self, A):
        from golden.blockfmt import BlockSparse

        return BlockSparse.encode(np.ascontiguousarray(A), (self.cfg.bm, self.cfg.bk))

    # ---- phases ----------------------------------------------------------------------
    def _gemm_sparse(self, backward: bool, A, X) -> np.ndarray:
        from golden.balance import backward_schedule, forward_schedule
        from hw.procrustes import Buf, Op, sched_words

        c = self.cfg
        bs = self._encode(A)
        M, K = bs.shape
        X = np.asarray(X, dtype=np.int64)
        J, N = X.shape
        NT = -(-N // c.cols)
        sched = (backward_schedule if backward else forward_schedule)(bs, c.rows, True, NT)
        Xp = np.zeros((J, NT * c.cols), dtype=np.int64)
        Xp[:, :N] = X
        xw = [_pack(Xp[j, t * c.cols:(t + 1) * c.cols], c.data_bits)
              for t in range(NT) for j in range(J)]
        sw = sched_words(sched.table().tolist())
        prog = self._load_weights(bs) + [self._load(Buf.SCHED, sw), self._load(Buf.X, xw),
                                         (self._cmd(Op.BWD if backward else Op.FWD, m=M, k=K,
                                                    n=N, addr=0, arg=0), [], 0)]
        jobs = sched.jobs
        banks = [r for r in range(c.rows) if len(jobs[r])]
        prog += [self._unload_y(r, len(jobs[r])) for r in banks]
        res = self.execute(prog)[-len(banks):] if banks else []
        Y = np.zeros((K if backward else M, NT * c.cols), dtype=np.int64)
        for r, (_, words) in zip(banks, res):
            for pos, j in enumerate(jobs[r].tolist()):
                row, t = divmod(j, NT)
                Y[row, t * c.cols:(t + 1) * c.cols] = _unpack(words[pos], c.data_bits, c.cols)
        return Y[:, :N]

    def forward(self, A, X) -> np.ndarray:
        return self._gemm_sparse(False, A, X)

    def backward(self, A, dY) -> np.ndarray:
        return self._gemm_sparse(True, A, dY)

    def _tiles(self, M, K):
        c = self.cfg
        return c.rows, c.cols, -(-M // c.rows), -(-K // c.cols)

    def weight_grad(self, dY, X) -> np.ndarray:
        from hw.procrustes import Buf, Op

        c = self.cfg
        dY, X = np.asarray(dY, dtype=np.int64), np.asarray(X, dtype=np.int64)
        M, N = dY.shape
        K = X.shape[0]
        R, C, MT, KT = self._tiles(M, K)
        dYp = np.zeros((MT * R, N), dtype=np.int64)
        dYp[:M] = dY
        Xp = np.zeros((KT * C, N), dtype=np.int64)
        Xp[:K] = X
        g = [_pack(dYp[mt * R:(mt + 1) * R, n], c.data_bits) for mt in range(MT)
             for n in range(N)]
        x = [_pack(Xp[kt * C:(kt + 1) * C, n], c.data_bits) for kt in range(KT)
             for n in range(N)]
        prog = [self._load(Buf.G, g), self._load(Buf.X, x),
                (self._cmd(Op.WGRAD, m=M, k=K, n=N), [], 0)]
        prog += [self._unload_y(r, MT * KT) for r in range(R)]
        res = self.execute(prog)[-R:]
        out = np.zeros((MT * R, KT * C), dtype=np.int64)
        for r, (_, words) in enumerate(res):
            for mt in range(MT):
                for kt in range(KT):
                    out[mt * R + r, kt * C:(kt + 1) * C] = _unpack(words[mt * KT + kt],
                                                                  c.data_bits, C)
        return out[:M, :K]

    def update(self, W, dW, theta: int, sp):
        """One parameter's update and re-encoding; ``(W' dense, theta', tracked count)``."""
        from golden.blockfmt import BlockSparse
        from hw.procrustes import Buf, Op, Reg

        c = self.cfg
        bs = self._encode(W)
        M, K = bs.shape
        R, C, MT, KT = self._tiles(M, K)
        p = np.zeros((MT * R, KT * C), dtype=np.int64)
        p[:M, :K] = np.asarray(dW, dtype=np.int64)
        prog = self._load_weights(bs)
        for r in range(R):
            words = [_pack(p[mt * R + r, kt * C:(kt + 1) * C], c.data_bits)
                     for mt in range(MT) for kt in range(KT)]
            prog.append(self._load(Buf.Y, words, arg=r))
        for reg, v in ((Reg.LR, sp.lr_q), (Reg.DECAY, sp.decay_q), (Reg.SEED, sp.seed),
                       (Reg.BOUND, sp.bound_q), (Reg.UP, sp.up_q), (Reg.DN, sp.dn_q),
                       (Reg.THETA, theta)):
            prog.append((self._cmd(Op.SET, sel=reg, arg=int(v) & 0xFFFFFFFF), [], 0))
        GM, GK = c.grid(M, K)
        prog += [(self._cmd(Op.UPDATE, m=M, k=K, addr=0, arg=0), [], 0),
                 (self._cmd(Op.GET, sel=Reg.THETA), [], 0),
                 (self._cmd(Op.GET, sel=Reg.TRACKED), [], 0),
                 (self._cmd(Op.UNLOAD, sel=Buf.BLOCKS, m=M, k=K, addr=0), [], GM * GK)]
        res = self.execute(prog)
        nnz, theta = res[-4][0]["value"], res[-3][0]["value"]
        self.tracked = res[-2][0]["value"]
        bw = res[-1][1]
        vals = []
        if nnz:
            (_, words), = self.execute([(self._cmd(Op.UNLOAD, sel=Buf.VALUES, addr=0,
                                                   count=nnz), [], nnz)])
            vals = [_unpack(w, c.data_bits, 1)[0] for w in words]
        masks = [w & ((1 << c.nb) - 1) for w in bw]
        ptrs = [(w >> c.nb) & ((1 << c.ptr_bits) - 1) for w in bw] + [nnz]
        new = BlockSparse.from_arrays((M, K), (c.bm, c.bk), np.array(masks, np.uint64),
                                      np.array(ptrs, np.uint32), np.array(vals, np.int64))
        return new.decode(), theta, self.tracked


class BoardAccel:
    """The four accelerator methods of ``FixedMLP`` on a board. The array counts tracked
    weights but does not export which ones: ``update`` returns the count as a mask with
    that many leading ``True`` (``FixedMLP`` only counts it)."""

    def __init__(self, bp: BoardProcrustes):
        self.bp = bp

    def forward(self, A, X, cfg):
        return self.bp.forward(A, X)

    def backward(self, A, dY, cfg):
        return self.bp.backward(A, dY)

    def weight_grad(self, dY, X, cfg):
        return self.bp.weight_grad(dY, X)

    def update(self, W, dW, theta, sp, cfg):
        new, th, count = self.bp.update(W, dW, theta, sp)
        mask = np.zeros(np.shape(W), dtype=bool)
        mask.flat[:count] = True
        return new, th, mask


POOL = {64: 1, 16: 2, 4: 4}


def digits_batches(features: int, classes: int, batch: int, steps: int, seed: int):
    """``steps`` minibatches of digits, images average-pooled to ``features`` inputs and
    labels folded to ``classes`` (``y mod classes``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    f = POOL[features]
    img = d.images.reshape(-1, 8 // f, f, 8 // f, f).mean(axis=(2, 4)) / 16.0
    x, y = img.reshape(len(img), -1), d.target % classes
    idx = np.random.default_rng(seed).permutation(len(x))
    for i in range(steps):
        sel = idx[(i * batch) % len(x):][:batch]
        yield x[sel], y[sel]


def _check_fit(cfg, sizes, batch) -> None:
    """Refuse a workload that would overflow one of the board's buffers."""
    c = cfg
    for i, o in zip(sizes[:-1], sizes[1:]):
        M, K = o, i + 1
        GM, GK = c.grid(M, K)
        NT = -(-batch // c.cols)
        MT, KT = -(-M // c.rows), -(-K // c.cols)
        need = {"blk_depth": c.bank_words(M, K), "val_depth": M * K,
                "x_depth": max(K * NT, M * NT, KT * batch), "g_depth": MT * batch,
                "y_depth": max(MT * KT, (-(-max(M, K) // c.rows) + 1) * NT)}
        for name, n in need.items():
            if n > getattr(c, name):
                raise ValueError(f"sizes and batch must fit the board's {name}="
                                 f"{getattr(c, name)}: layer {i}->{o} with batch {batch} "
                                 f"needs {n}")


def procrustes_steps(board, *, steps: int, sizes: tuple, batch: int, lr: float, seed: int,
                     finish) -> ProcrustesReport:
    from golden import procrustes_ref as ref

    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or len(sizes) > 4:
        raise ValueError(f"sizes must have 2..4 entries, not {len(sizes)}")
    if sizes[0] not in POOL:
        raise ValueError(f"sizes[0] must be one of 64, 16, 4 (digits pooled), not {sizes[0]}")
    if any(not 2 <= s <= 256 for s in sizes[1:]):
        raise ValueError(f"sizes[1:] must be in 2..256, not {list(sizes[1:])}")
    for name, v, lo, hi in (("steps", steps, 1, 1000), ("batch", batch, 1, 256)):
        if not lo <= v <= hi:
            raise ValueError(f"{name} must be in {lo}..{hi}, not {v}")
    if not 0 < lr < 1:
        raise ValueError(f"lr must be in (0, 1), not {lr}")
    bp = BoardProcrustes(board)
    c = bp.cfg
    _check_fit(c, sizes, batch)
    fc = ref.FixedConfig(c.data_bits, c.acc_bits, c.w_frac, c.x_frac, c.g_frac)
    kw = dict(cfg=fc, seed=seed, lr=lr)
    on_board = ref.FixedMLP(sizes, accel=BoardAccel(bp), **kw)
    gold = ref.FixedMLP(sizes, **kw)
    t0 = board.link.clock()
    board.clear()
    mismatches, items, first, losses = 0, 0, None, []

    def check(a, b, what):
        nonlocal mismatches, items, first
        items += 1
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or not np.array_equal(a, b):
            mismatches += 1
            if first is None:
                where = (f"shape {a.shape} vs {b.shape}" if a.shape != b.shape else
                         f"{int(np.sum(a != b))} elements, first at "
                         f"{tuple(int(v) for v in np.argwhere(a != b)[0])}")
                first = f"{what}: {where}"

    for step, (x, y) in enumerate(digits_batches(sizes[0], sizes[-1], batch, steps, seed)):
        loss = on_board.train_step(x, y, trace=True)
        want = gold.train_step(x, y, trace=True)
        losses.append(loss)
        tb, tg = on_board.last_trace, gold.last_trace
        for name in ("z", "dx", "dw"):
            for layer, (a, b) in enumerate(zip(getattr(tb, name), getattr(tg, name))):
                if b is not None:
                    check(a, b, f"step {step}: {name}[{layer}]")
        for ub, ug in zip(tb.updates, tg.updates):
            check(ub[6], ug[6], f"step {step}: update {ug[0]}")
            check(ub[3], ug[3], f"step {step}: theta after {ug[0]}")
            check(int(ub[7].sum()), int(ug[7].sum()), f"step {step}: tracked in {ug[0]}")
        check(loss if math.isfinite(loss) else -1.0, want if math.isfinite(want) else -1.0,
              f"step {step}: loss")
    base = finish(board, "procrustes", items, 0, 0, mismatches, t0, first)
    st = board.status()
    return ProcrustesReport(base.design, base.items, st["in_beats"], st["out_beats"],
                            base.mismatches, base.cycles, base.wall_s, base.link,
                            base.first_error, accel_cycles=dict(bp.cycles), losses=losses)
