"""The merge unit on a board: frames out, merged tokens, merge maps and status back.

Host side only (numpy/torch through the golden model; no Amaranth): stream layouts come
from the board's descriptor. Per frame the host sends one ``cfg`` beat and the tokens as
``C/P`` beats each (``last_token`` on a token's final beat, ``last`` on the frame's), and
expects ``prefix + (H - r_h)(W - r_w)`` tokens on ``o``, ``H*W`` entries on ``map`` and
one ``status`` beat, each checked bit for bit against ``golden.cubist_fixed``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cubist_frames"]


def _beats(tokens: np.ndarray, lanes: int) -> list[dict]:
    out = []
    c = tokens.shape[1]
    for t in tokens:
        for b in range(c // lanes):
            out.append({"data": [int(x) for x in t[b * lanes:(b + 1) * lanes]],
                        "last_token": int(b == c // lanes - 1), "last": 0})
    out[-1]["last"] = 1
    return out


def cubist_frames(board, *, frames: int, r_h: int, r_w: int, prefix: int, seed: int,
                  finish):
    from golden.cubist_fixed import merge_2d_fixed

    p = board.info["params"]
    h, w, c, lanes, width = p["h"], p["w"], p["c"], p["lanes"], p["width"]
    for name, v, hi in (("r_h", r_h, h // 2), ("r_w", r_w, w // 2),
                        ("prefix", prefix, p["max_prefix"]), ("frames", frames, 1000)):
        if not 0 <= v <= hi:
            raise ValueError(f"{name} must be in 0..{hi}, not {v}")
    rng = np.random.default_rng(seed)
    lo, top = -(1 << (width - 1)), (1 << (width - 1)) - 1
    work, cfgs, beats = [], [], []
    for _ in range(frames):
        tok = rng.integers(lo, top + 1, size=(prefix + h * w, c))
        cfg = {"h": h, "w": w, "r_h": r_h, "r_w": r_w, "prefix": prefix}
        merged, mmap = merge_2d_fixed(tok, (h, w), (r_h, r_w), prefix=prefix, width=width,
                                      frac_bits=p["frac_bits"])
        work.append((merged.numpy(), mmap.numpy()))
        cfgs.append(cfg)
        beats += _beats(tok, lanes)
    cod = board.codecs
    n_out = sum(m.shape[0] for m, _ in work) * (c // lanes)
    t0 = board.link.clock()
    board.clear()
    got = board.transfer(
        {"cfg": cod["cfg"].encode_all(cfgs), "i": cod["i"].encode_all(beats)},
        {"o": n_out * cod["o"].nbytes, "map": frames * h * w * cod["map"].nbytes,
         "status": frames * cod["status"].nbytes})
    o = cod["o"].decode_all(got["o"])
    maps = cod["map"].decode_all(got["map"])
    status = cod["status"].decode_all(got["status"])
    mismatches, first, pos = 0, None, 0
    for n, (merged, mmap) in enumerate(work):
        k = merged.shape[0] * (c // lanes)
        tok = np.array([b["data"] for b in o[pos:pos + k]]).reshape(merged.shape)
        pos += k
        got_map = np.array([e["index"] for e in maps[n * h * w:(n + 1) * h * w]])
        errs = []
        if not np.array_equal(tok, merged):
            errs.append(f"frame {n}: merged tokens differ at "
                        f"{np.argwhere(tok != merged)[0].tolist()}")
        if not np.array_equal(got_map, mmap):
            errs.append(f"frame {n}: merge map differs")
        if status[n]["error"] != 0:
            errs.append(f"frame {n}: status error {status[n]['error']}")
        mismatches += bool(errs)
        first = first or (errs[0] if errs else None)
    return finish(board, "cubist", frames, len(cfgs) + len(beats), len(o) + len(maps) + frames,
                  mismatches, t0, first)
