"""Host driver of the Procrustes RTL for cocotb: commands, buffer images, and the four
accelerator phases with numpy in and out.

Not a test module: ``tb_procrustes.py`` and the benchmark use :class:`ProcrustesHost`.
The host prepares the memory images from the golden models (``golden.blockfmt`` for the
weight format, ``golden.balance`` for the schedule table) and reassembles results.
"""

from __future__ import annotations

import numpy as np
from cocotb.triggers import with_timeout

from golden.balance import backward_schedule, forward_schedule
from golden.blockfmt import BlockSparse
from hw.procrustes import Buf, Config, Op, Reg, cmd_layout, resp_layout, sched_words
from sim.streams import NoPauses, StreamSink, StreamSource, StructCodec, pack_lanes, unpack_lanes

__all__ = ["CommandError", "ProcrustesHost"]


class CommandError(RuntimeError):
    """The array answered a command with a non-zero error code."""


class ProcrustesHost:
    """Drives ``cmd``/``din`` and receives ``resp``/``dout`` of a ``Procrustes`` DUT."""

    def __init__(self, dut, cfg: Config, *, src_pauses=None, sink_pauses=None,
                 timeout_cycles: int = 2_000_000):
        self.dut, self.cfg = dut, cfg
        self.cmd_codec = StructCodec.from_layout(cmd_layout())
        self.resp_codec = StructCodec.from_layout(resp_layout())
        self.cmd = StreamSource(dut, "cmd", dut.clk, pauses=src_pauses,
                                codec=self.cmd_codec)
        self.din = StreamSource(dut, "din", dut.clk, pauses=src_pauses or NoPauses())
        self.resp = StreamSink(dut, "resp", dut.clk, pauses=sink_pauses,
                               codec=self.resp_codec)
        self.dout = StreamSink(dut, "dout", dut.clk, pauses=sink_pauses)
        self.timeout_ns = 10 * timeout_cycles
        self.cycles: dict[str, int] = {}
        self.tracked = 0  # weights tracked by the last update (the RTL's count)

    # ---- raw commands -----------------------------------------------------------------
    async def command(self, op, *, check: bool = True, words=None, unload: int = 0,
                      **fields) -> dict:
        """Send one command (with ``words`` on ``din``), collect ``unload`` words from
        ``dout`` and the response. Raises :class:`CommandError` if ``check`` and the
        array reports an error."""
        self.cmd.send({"op": int(op), **{k: int(v) for k, v in fields.items()}})
        if words is not None:
            self.din.send_all(int(w) for w in words)
        out = []
        if unload:
            out = await with_timeout(self.dout.recv_n(unload), self.timeout_ns, "ns")
        resp = await with_timeout(self.resp.recv(), self.timeout_ns, "ns")
        if resp["op"] != int(op):
            raise AssertionError(f"response for op {resp['op']}, expected {int(op)}")
        if check and resp["err"]:
            raise CommandError(f"{Op(int(op)).name} failed with error {resp['err']}")
        resp["data"] = out
        return resp

    async def set_reg(self, reg: Reg, value: int) -> None:
        await self.command(Op.SET, sel=reg, arg=int(value) & 0xFFFFFFFF)

    async def get_reg(self, reg: Reg) -> int:
        return (await self.command(Op.GET, sel=reg))["value"]

    # ---- buffer images --------------------------------------------------------------
    async def load_weights(self, bs: BlockSparse, blk_base: int = 0, val_base: int = 0):
        c = self.cfg
        if bs.block != (c.bm, c.bk):
            raise ValueError(f"block must be {(c.bm, c.bk)}, not {bs.block}")
        M, K = bs.shape
        words = [int(mk) | (int(p) << c.nb) for mk, p in zip(bs.masks, bs.ptr[:-1])]
        await self.command(Op.LOAD, sel=Buf.BLOCKS, m=M, k=K, addr=blk_base, words=words)
        if bs.nnz:
            vals = [int(v) & ((1 << c.data_bits) - 1) for v in bs.values]
            await self.command(Op.LOAD, sel=Buf.VALUES, addr=val_base, count=len(vals),
                               words=vals)

    async def unload_weights(self, M: int, K: int, nnz: int, blk_base: int = 0,
                             val_base: int = 0) -> BlockSparse:
        c = self.cfg
        GM, GK = c.grid(M, K)
        r = await self.command(Op.UNLOAD, sel=Buf.BLOCKS, m=M, k=K, addr=blk_base,
                               unload=GM * GK)
        masks = [w & ((1 << c.nb) - 1) for w in r["data"]]
        ptrs = [(w >> c.nb) & ((1 << c.ptr_bits) - 1) for w in r["data"]] + [nnz]
        vals = []
        if nnz:
            r = await self.command(Op.UNLOAD, sel=Buf.VALUES, addr=val_base, count=nnz,
                                   unload=nnz)
            vals = unpack_lanes_list(r["data"], c.data_bits)
        return BlockSparse.from_arrays((M, K), (c.bm, c.bk), np.array(masks, np.uint64),
                                       np.array(ptrs, np.uint32), np.array(vals, np.int64))

    async def load_sched(self, sched) -> None:
        words = sched_words(sched.table().tolist())
        await self.command(Op.LOAD, sel=Buf.SCHED, addr=0, count=len(words), words=words)

    async def load_x(self, X: np.ndarray) -> None:
        """Operand buffer for FWD/BWD: word ``t·J + j`` = ``X[j, t·C : t·C + C]``."""
        C = self.cfg.cols
        J, N = X.shape
        NT = -(-N // C)
        Xp = np.zeros((J, NT * C), dtype=np.int64)
        Xp[:, :N] = X
        words = [pack_lanes(Xp[j, t * C:(t + 1) * C], self.cfg.data_bits)
                 for t in range(NT) for j in range(J)]
        await self.command(Op.LOAD, sel=Buf.X, addr=0, count=len(words), words=words)

    async def unload_bank(self, r: int, count: int) -> list[list[int]]:
        if count == 0:
            return []
        res = await self.command(Op.UNLOAD, sel=Buf.Y, arg=r, addr=0, count=count,
                                 unload=count)
        return [unpack_lanes(w, self.cfg.data_bits, self.cfg.cols) for w in res["data"]]

    # ---- phases ---------------------------------------------------------------------
    async def _gemm_sparse(self, op, bs: BlockSparse, X: np.ndarray, sched, out_rows: int,
                           blk_base: int, val_base: int, load: bool) -> np.ndarray:
        c = self.cfg
        M, K = bs.shape
        N = X.shape[1]
        NT = -(-N // c.cols)
        if load:
            await self.load_weights(bs, blk_base, val_base)
        await self.load_sched(sched)
        await self.load_x(X)
        r = await self.command(op, m=M, k=K, n=N, addr=blk_base, arg=val_base)
        self.cycles[Op(op).name] = r["cycles"]
        Y = np.zeros((out_rows, NT * c.cols), dtype=np.int64)
        for pe, jobs in enumerate(sched.jobs):
            words = await self.unload_bank(pe, len(jobs))
            for pos, j in enumerate(jobs.tolist()):
                row, t = divmod(j, NT)
                Y[row, t * c.cols:(t + 1) * c.cols] = words[pos]
        return Y[:, :N]

    def _nt(self, X) -> int:
        """Tiles of ``cols`` minibatch columns: the schedule's jobs per output row."""
        return -(-np.shape(X)[1] // self.cfg.cols)

    async def forward(self, bs: BlockSparse, X, *, balanced: bool = True, blk_base: int = 0,
                      val_base: int = 0, load: bool = True) -> np.ndarray:
        """``Y = W·X`` on the array (W in block format, X int [K, N])."""
        sched = forward_schedule(bs, self.cfg.rows, balanced, self._nt(X))
        return await self._gemm_sparse(Op.FWD, bs, np.asarray(X), sched, bs.shape[0],
                                       blk_base, val_base, load)

    async def backward(self, bs: BlockSparse, dY, *, balanced: bool = True,
                       blk_base: int = 0, val_base: int = 0, load: bool = True) -> np.ndarray:
        """``dX = Wᵀ·dY`` from the same store (column walk)."""
        sched = backward_schedule(bs, self.cfg.rows, balanced, self._nt(dY))
        return await self._gemm_sparse(Op.BWD, bs, np.asarray(dY), sched, bs.shape[1],
                                       blk_base, val_base, load)

    async def weight_grad(self, dY, X) -> np.ndarray:
        """``dW = dY·Xᵀ`` (dense); the result stays in the result banks for UPDATE."""
        c = self.cfg
        dY, X = np.asarray(dY), np.asarray(X)
        M, N = dY.shape
        K = X.shape[0]
        R, C = c.rows, c.cols
        MT, KT = -(-M // R), -(-K // C)
        dYp = np.zeros((MT * R, N), dtype=np.int64)
        dYp[:M] = dY
        Xp = np.zeros((KT * C, N), dtype=np.int64)
        Xp[:K] = X
        g = [pack_lanes(dYp[mt * R:(mt + 1) * R, n], c.data_bits)
             for mt in range(MT) for n in range(N)]
        x = [pack_lanes(Xp[kt * C:(kt + 1) * C, n], c.data_bits)
             for kt in range(KT) for n in range(N)]
        await self.command(Op.LOAD, sel=Buf.G, addr=0, count=len(g), words=g)
        await self.command(Op.LOAD, sel=Buf.X, addr=0, count=len(x), words=x)
        r = await self.command(Op.WGRAD, m=M, k=K, n=N)
        self.cycles["WGRAD"] = r["cycles"]
        return await self.unload_dw(M, K)

    async def weight_grad_sparse(self, dY, X, *, balanced: bool = True, blk_base: int = 0,
                                 val_base: int = 0) -> np.ndarray:
        """``dW = dY·Xᵀ`` as ``dWᵀ = X·dYᵀ`` (``WGRADX``): the activations X [K, N] in the
        block format, so zero activations cost no cycle. Overwrites the weight store at
        ``blk_base``/``val_base``; the result banks hold dWᵀ in the job layout (reload dW
        with :meth:`load_dw` before an UPDATE)."""
        c = self.cfg
        dY, X = np.asarray(dY), np.asarray(X)
        bs = BlockSparse.encode(X, (c.bm, c.bk))
        dYt = np.ascontiguousarray(dY.T)
        sched = forward_schedule(bs, c.rows, balanced, self._nt(dYt))
        dWt = await self._gemm_sparse(Op.WGRADX, bs, dYt, sched, X.shape[0], blk_base,
                                      val_base, True)
        return dWt.T

    def _dw_layout(self, M, K):
        c = self.cfg
        R, C = c.rows, c.cols
        MT, KT = -(-M // R), -(-K // C)
        return R, C, MT, KT

    async def unload_dw(self, M: int, K: int) -> np.ndarray:
        R, C, MT, KT = self._dw_layout(M, K)
        out = np.zeros((MT * R, KT * C), dtype=np.int64)
        for r in range(R):
            words = await self.unload_bank(r, MT * KT)
            for mt in range(MT):
                for kt in range(KT):
                    out[mt * R + r, kt * C:(kt + 1) * C] = words[mt * KT + kt]
        return out[:M, :K]

    async def load_dw(self, dW) -> None:
        c = self.cfg
        dW = np.asarray(dW)
        M, K = dW.shape
        R, C, MT, KT = self._dw_layout(M, K)
        p = np.zeros((MT * R, KT * C), dtype=np.int64)
        p[:M, :K] = dW
        for r in range(R):
            words = [pack_lanes(p[mt * R + r, kt * C:(kt + 1) * C], c.data_bits)
                     for mt in range(MT) for kt in range(KT)]
            await self.command(Op.LOAD, sel=Buf.Y, arg=r, addr=0, count=len(words),
                               words=words)

    async def update(self, bs: BlockSparse, dW, theta: int, sp, *, blk_base: int = 0,
                     val_base: int = 0, load: bool = True, load_dw: bool = True):
        """The weight update of one layer; returns ``(new BlockSparse, theta)``."""
        M, K = bs.shape
        if load:
            await self.load_weights(bs, blk_base, val_base)
        if load_dw:
            await self.load_dw(dW)
        for reg, v in ((Reg.LR, sp.lr_q), (Reg.DECAY, sp.decay_q), (Reg.SEED, sp.seed),
                       (Reg.BOUND, sp.bound_q), (Reg.UP, sp.up_q), (Reg.DN, sp.dn_q),
                       (Reg.THETA, theta)):
            await self.set_reg(reg, v)
        r = await self.command(Op.UPDATE, m=M, k=K, addr=blk_base, arg=val_base)
        self.cycles["UPDATE"] = r["cycles"]
        nnz = r["value"]
        theta = await self.get_reg(Reg.THETA)
        self.tracked = await self.get_reg(Reg.TRACKED)
        new = await self.unload_weights(M, K, nnz, blk_base, val_base)
        return new, theta


def unpack_lanes_list(words, bits: int) -> list[int]:
    return [unpack_lanes(w, bits, 1)[0] for w in words]
