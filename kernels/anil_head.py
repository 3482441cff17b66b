"""Triton kernels of the fused ANIL inner loop, in the small S x N space.

After one pass over the features (GEMMs, done by the caller):
    Z0 = F W^T + b [T,S,N], Kss = F F^T + 1 [T,S,S], Aq = Fq W^T + b [T,Q,N], Kqs = Fq F^T + 1
the adapted head after k SGD steps is W_k = W - lr H_k^T F, b_k = b - lr 1^T H_k with
H_k = sum of the support-logit gradients so far, so every inner step is
    Z = Z0 - lr Kss H;  P = softmax(Z);  H += (P - Y) / S
and the query logits are Aq - lr Kqs H. `inner_loop_forward` runs all steps and the query loss
for every task in one launch (one program per task). `inner_loop_reverse` runs the analytic
backward of the loop in one launch: it recomputes the steps, then walks them in reverse and
stores the adjoint ZB_k of every step's logits (softmax Jacobian-vector products); the
adjoints of Z0 and Kss are then a sum and one GEMM over that history (adjoints_from_history).

Shapes: N <= 64 ways, any S and Q. Small tasks keep Kss and H in registers; larger ones use
the tiled kernels, which keep H in a per-task scratch buffer and multiply by Kss in
ROWS x ROWS tiles. `forward_launch` / `reverse_launch` decide every launch (kernel, block sizes, warps,
stages), for the launchers and for the kernel report (report.py), which compiles them for
sm_80/86/89/90 without a GPU and checks they fit and do not spill. float64 inputs use the
exact batched-torch versions below (`torch_inner_loop_*`), which are also the kernels' test
oracle. All accumulation is fp32.

The inner step (and its reverse) is written in four places, each for a reason: the register
and the tiled kernels here (a task's Kss fits in registers only up to the footprint limits
below), the batched-torch oracle (tests, float64, more than 64 ways) and the CPU kernel in
csrc/anil_head.cpp (one task's loop per thread, cache-resident). Everything around the loop
(feature GEMMs, the backward's GEMMs, labels) is written once, in anil_fast/ops.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # anil_fast works without triton; only this backend is then missing
    HAVE_TRITON = False

MAX_WAYS = 64
SCRATCH_BYTES = 1 << 30  # per launch of the reverse kernel; larger batches run in chunks
# Register kernels hold a task's Kss [BLOCK_S, BLOCK_S] and a few [BLOCK_S, BLOCK_N] tiles in
# registers; beyond the footprints below the tiled kernels (H in a scratch buffer, Kss read in
# ROWS x ROWS tiles) take over. Limits, warps, stages and tiles were chosen with the kernel
# report (report.py): every launch the functions below choose for the preset shapes compiles
# for sm_80/86/89/90 without register spills (triton 3.8).
FORWARD_REGISTER_LIMIT = 8192  # elements of BLOCK_S * (BLOCK_S + 2 * BLOCK_N)
REVERSE_REGISTER_LIMIT = 6144  # the reverse keeps more tiles live
FORWARD_TILE_ROWS = 32
REVERSE_TILE_ROWS = 16


def _block(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())  # tl.dot needs every dim >= 16


def _footprint(block_s: int, block_n: int) -> int:
    return block_s * (block_s + 2 * block_n)


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: which @triton.jit function of this module, its constexpr
    block sizes, warps and pipeline stages. Decided by forward_launch / reverse_launch alone:
    the launchers below and the kernel report (report.py) both call them."""
    kernel: str
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int

    def options(self) -> dict:
        return {**dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}


def forward_launch(s_rows: int, q_rows: int, ways: int) -> Launch:
    """The forward (all inner steps + query loss) launch for one task shape (the same on every
    architecture: kernels.report shows it fits sm_80-sm_90)."""
    bs, bn, block_q = _block(s_rows), _block(ways), min(64, _block(q_rows))
    footprint = _footprint(bs, bn)
    if footprint <= FORWARD_REGISTER_LIMIT:
        return Launch("_inner_loop_fwd_kernel", (("BLOCK_S", bs), ("BLOCK_N", bn), ("BLOCK_Q", block_q)),
                      num_warps=4 if footprint <= 3072 else 8, num_stages=1)
    return Launch("_tiled_fwd_kernel", (("ROWS", FORWARD_TILE_ROWS), ("BLOCK_N", bn),
                                        ("BLOCK_Q", min(block_q, 32))), num_warps=8, num_stages=1)


def reverse_launch(s_rows: int, ways: int) -> Launch:
    """The backward (reversed inner loop) launch for one task shape."""
    bs, bn = _block(s_rows), _block(ways)
    footprint = _footprint(bs, bn)
    if footprint <= REVERSE_REGISTER_LIMIT:
        return Launch("_inner_loop_bwd_kernel", (("BLOCK_S", bs), ("BLOCK_N", bn)),
                      num_warps=4 if footprint <= 3072 else 8, num_stages=1)
    return Launch("_tiled_bwd_kernel", (("ROWS", REVERSE_TILE_ROWS), ("BLOCK_N", bn)),
                  num_warps=8, num_stages=3)


if HAVE_TRITON:
    @triton.jit
    def _softmax_rows(z, col_ok):
        z = tl.where(col_ok, z, -float("inf"))
        e = tl.exp(z - tl.max(z, 1)[:, None])
        return e / tl.sum(e, 1)[:, None]

    @triton.jit
    def _query_rows(AQ, YQ, LOGITS, t, rq, Q, N, rn, kqs_h, lr):
        """Query logits Aq - lr Kqs H of rows rq (kqs_h = Kqs H) stored; their CE sum returned."""
        q_ok = rq < Q
        n_ok = rn < N
        qn_ok = q_ok[:, None] & n_ok[None, :]
        aq = tl.load(AQ + t * Q * N + rq[:, None] * N + rn[None, :], mask=qn_ok, other=0.0).to(tl.float32)
        zq = aq - lr * kqs_h
        tl.store(LOGITS + t * Q * N + rq[:, None] * N + rn[None, :], zq, mask=qn_ok)
        zm = tl.where(n_ok[None, :], zq, -float("inf"))
        mx = tl.max(zm, 1)
        lse = mx + tl.log(tl.sum(tl.exp(zm - mx[:, None]), 1))
        yq = tl.load(YQ + t * Q + rq, mask=q_ok, other=-1)
        picked = tl.sum(tl.where(yq[:, None] == rn[None, :], zq, 0.0), 1)
        return tl.sum(tl.where(q_ok, lse - picked, 0.0), 0)

    @triton.jit
    def _load_task(Z0, KSS, YS, t, S, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
        """One task's Z0 [BS,BN], Kss [BS,BS] and one-hot support labels, zero-padded."""
        rs = tl.arange(0, BLOCK_S)
        rn = tl.arange(0, BLOCK_N)
        s_ok = rs < S
        sn_ok = s_ok[:, None] & (rn < N)[None, :]
        z0 = tl.load(Z0 + t * S * N + rs[:, None] * N + rn[None, :], mask=sn_ok, other=0.0).to(tl.float32)
        kss = tl.load(KSS + t * S * S + rs[:, None] * S + rs[None, :],
                      mask=s_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
        ys = tl.load(YS + t * S + rs, mask=s_ok, other=-1)
        y = (ys[:, None] == rn[None, :]).to(tl.float32)
        return z0, kss, y

    @triton.jit
    def _inner_loop_fwd_kernel(Z0, KSS, YS, AQ, KQS, YQ, H_OUT, LOGITS, LOSSES,
                               S, Q, N, steps, lr,
                               BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_Q: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        rs = tl.arange(0, BLOCK_S)
        rn = tl.arange(0, BLOCK_N)
        s_ok = rs < S
        n_ok = rn < N
        sn_ok = s_ok[:, None] & n_ok[None, :]
        z0, kss, y = _load_task(Z0, KSS, YS, t, S, N, BLOCK_S, BLOCK_N)
        h = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        for _ in range(steps):
            z = z0 - lr * tl.dot(kss, h, input_precision="ieee")
            p = _softmax_rows(z, n_ok[None, :])
            h += tl.where(sn_ok, (p - y) / S, 0.0)
        tl.store(H_OUT + t * S * N + rs[:, None] * N + rn[None, :], h, mask=sn_ok)
        loss = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), 0)
        for q0 in range(0, Q, BLOCK_Q):
            rq = q0 + tl.arange(0, BLOCK_Q)
            q_ok = rq < Q
            kqs = tl.load(KQS + t * Q * S + rq[:, None] * S + rs[None, :],
                          mask=q_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
            loss += _query_rows(AQ, YQ, LOGITS, t, rq, Q, N, rn,
                                tl.dot(kqs, h, input_precision="ieee"), lr)
        tl.store(LOSSES + t, loss / Q)

    @triton.jit
    def _inner_loop_bwd_kernel(Z0, KSS, YS, HBAR, HIST, PHIST, ZBHIST, S, N, steps, lr,
                               BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
        """The adjoint ZB_k of every step's support logits, given that of H_K. H_k and ZB_k are
        stored as [BLOCK_S, steps, BLOCK_N] per task; the caller turns them into the adjoints
        of Z0 and Kss with one sum and one GEMM (adjoints_from_history), so neither [S,S]
        accumulator has to live in registers here."""
        t = tl.program_id(0).to(tl.int64)
        rs = tl.arange(0, BLOCK_S)
        rn = tl.arange(0, BLOCK_N)
        s_ok = rs < S
        n_ok = rn < N
        sn_ok = s_ok[:, None] & n_ok[None, :]
        z0, kss, y = _load_task(Z0, KSS, YS, t, S, N, BLOCK_S, BLOCK_N)
        history = t * BLOCK_S * steps * BLOCK_N + rs[:, None] * steps * BLOCK_N + rn[None, :]
        probs = PHIST + t * steps * BLOCK_S * BLOCK_N + rs[:, None] * BLOCK_N + rn[None, :]
        # Recompute the forward loop, keeping every step's H_k and softmax P_k.
        h = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
        for k in range(steps):
            tl.store(HIST + history + k * BLOCK_N, h)
            p = _softmax_rows(z0 - lr * tl.dot(kss, h, input_precision="ieee"), n_ok[None, :])
            tl.store(probs + k * BLOCK_S * BLOCK_N, p)
            h += tl.where(sn_ok, (p - y) / S, 0.0)
        tl.debug_barrier()  # P_k is read back by other threads of this program
        hb = tl.load(HBAR + t * S * N + rs[:, None] * N + rn[None, :], mask=sn_ok, other=0.0).to(tl.float32)
        for i in range(steps):
            k = steps - 1 - i
            p = tl.load(probs + k * BLOCK_S * BLOCK_N)
            zb = tl.where(sn_ok, p * (hb - tl.sum(p * hb, 1)[:, None]) / S, 0.0)
            tl.store(ZBHIST + history + k * BLOCK_N, zb)
            hb -= lr * tl.dot(kss, zb, input_precision="ieee")


    # -- support sets larger than one register tile: H lives in a per-task scratch buffer and
    # every product with Kss runs over (ROWS x ROWS) tiles; same maths as the kernels above.
    @triton.jit
    def _kss_rows_times(KSS, t, rows, S, M, ld, rn, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Kss[rows, :] @ M for one task; M [S_pad, BLOCK_N] zero-padded, row stride ld."""
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, S, ROWS):
            cols = c0 + tl.arange(0, ROWS)
            k = tl.load(KSS + t * S * S + rows[:, None] * S + cols[None, :],
                        mask=(rows < S)[:, None] & (cols < S)[None, :], other=0.0).to(tl.float32)
            m = tl.load(M + cols[:, None] * ld + rn[None, :])
            acc += tl.dot(k, m, input_precision="ieee")
        return acc

    @triton.jit
    def _tiled_step(Z0, KSS, YS, SRC, DST, ld, P, ld_p, t, S, N, lr, ROWS: tl.constexpr,
                    BLOCK_N: tl.constexpr, STORE_P: tl.constexpr):
        """DST = SRC + (softmax(Z0 - lr Kss SRC) - Y) / S row block by row block (row stride
        ld), and the softmax into P (row stride ld_p) when STORE_P."""
        rn = tl.arange(0, BLOCK_N)
        n_ok = rn < N
        for r0 in range(0, S, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            rn_ok = (rows < S)[:, None] & n_ok[None, :]
            acc = _kss_rows_times(KSS, t, rows, S, SRC, ld, rn, ROWS, BLOCK_N)
            z0 = tl.load(Z0 + t * S * N + rows[:, None] * N + rn[None, :], mask=rn_ok, other=0.0).to(tl.float32)
            p = _softmax_rows(z0 - lr * acc, n_ok[None, :])
            if STORE_P:
                tl.store(P + rows[:, None] * ld_p + rn[None, :], p)
            ys = tl.load(YS + t * S + rows, mask=rows < S, other=-1)
            y = (ys[:, None] == rn[None, :]).to(tl.float32)
            block = rows[:, None] * ld + rn[None, :]
            h = tl.load(SRC + block)
            tl.store(DST + block, h + tl.where(rn_ok, (p - y) / S, 0.0))

    @triton.jit
    def _tiled_fwd_kernel(Z0, KSS, YS, AQ, KQS, YQ, SCR, H_OUT, LOGITS, LOSSES,
                          S, Q, N, S_PAD, steps, lr,
                          ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        rn = tl.arange(0, BLOCK_N)
        n_ok = rn < N
        plane = S_PAD * BLOCK_N
        scr = SCR + t * 2 * plane  # two zeroed [S_PAD, BLOCK_N] buffers, used in turn
        for k in range(steps):
            _tiled_step(Z0, KSS, YS, scr + (k % 2) * plane, scr + ((k + 1) % 2) * plane, BLOCK_N,
                        scr, BLOCK_N, t, S, N, lr, ROWS, BLOCK_N, False)
            tl.debug_barrier()  # the next step reads rows other threads wrote
        h = scr + (steps % 2) * plane
        for r0 in range(0, S, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            tl.store(H_OUT + t * S * N + rows[:, None] * N + rn[None, :],
                     tl.load(h + rows[:, None] * BLOCK_N + rn[None, :]),
                     mask=(rows < S)[:, None] & n_ok[None, :])
        loss = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), 0)
        for q0 in range(0, Q, BLOCK_Q):
            rq = q0 + tl.arange(0, BLOCK_Q)
            q_ok = rq < Q
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, S, ROWS):
                cols = c0 + tl.arange(0, ROWS)
                kq = tl.load(KQS + t * Q * S + rq[:, None] * S + cols[None, :],
                             mask=q_ok[:, None] & (cols < S)[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(kq, tl.load(h + cols[:, None] * BLOCK_N + rn[None, :]),
                              input_precision="ieee")
            loss += _query_rows(AQ, YQ, LOGITS, t, rq, Q, N, rn, acc, lr)
        tl.store(LOSSES + t, loss / Q)

    @triton.jit
    def _tiled_bwd_kernel(Z0, KSS, YS, HIST, PHIST, HB, ZBHIST, S, N, S_PAD, steps, lr,
                          ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The register backward's job for large support sets: ZB_k of every step, stored
        with H_k as [S_PAD, steps(+1), BLOCK_N] per task for adjoints_from_history."""
        t = tl.program_id(0).to(tl.int64)
        rn = tl.arange(0, BLOCK_N)
        n_ok = rn < N
        ld_h = (steps + 1) * BLOCK_N  # H_0 .. H_steps; H_0 zeroed by the caller
        ld = steps * BLOCK_N
        hist = HIST + t * S_PAD * ld_h
        probs = PHIST + t * S_PAD * ld
        zbh = ZBHIST + t * S_PAD * ld
        hb = HB + t * S_PAD * BLOCK_N  # adjoint of H, zero-padded
        for k in range(steps):  # recompute the forward, keeping every H_k and P_k
            _tiled_step(Z0, KSS, YS, hist + k * BLOCK_N, hist + (k + 1) * BLOCK_N, ld_h,
                        probs + k * BLOCK_N, ld, t, S, N, lr, ROWS, BLOCK_N, True)
            tl.debug_barrier()
        for i in range(steps):
            k = steps - 1 - i
            for r0 in range(0, S_PAD, ROWS):  # adjoint of Z_k: the softmax JVP, row by row
                rows = r0 + tl.arange(0, ROWS)
                rn_ok = (rows < S)[:, None] & n_ok[None, :]
                p = tl.load(probs + k * BLOCK_N + rows[:, None] * ld + rn[None, :])
                hbr = tl.load(hb + rows[:, None] * BLOCK_N + rn[None, :])
                zbr = tl.where(rn_ok, p * (hbr - tl.sum(p * hbr, 1)[:, None]) / S, 0.0)
                tl.store(zbh + k * BLOCK_N + rows[:, None] * ld + rn[None, :], zbr)
            tl.debug_barrier()
            for r0 in range(0, S, ROWS):  # pass it on to H_k: hb -= lr Kss ZB_k
                rows = r0 + tl.arange(0, ROWS)
                acc = _kss_rows_times(KSS, t, rows, S, zbh + k * BLOCK_N, ld, rn, ROWS, BLOCK_N)
                block = hb + rows[:, None] * BLOCK_N + rn[None, :]
                tl.store(block, tl.load(block) - lr * acc)
            tl.debug_barrier()


def kernel_supports(ways: int) -> bool:
    """Any number of support and query rows; at most MAX_WAYS ways (one register row)."""
    return HAVE_TRITON and ways <= MAX_WAYS


def padded_rows(rows: int, tile: int) -> int:
    return -(-rows // tile) * tile


def inner_loop_forward(z0, kss, ys, aq, kqs, yq, lr: float, steps: int):
    """(H_K [T,S,N], query logits [T,Q,N], losses [T]) in fp32, one launch for all tasks."""
    tasks, s_rows, ways = z0.shape
    q_rows = aq.shape[1]
    if not kernel_supports(ways) or z0.dtype == torch.float64:
        return torch_inner_loop_forward(z0, kss, ys, aq, kqs, yq, lr, steps)
    h = torch.empty_like(z0)
    logits = torch.empty_like(aq)
    losses = torch.empty(tasks, device=z0.device, dtype=z0.dtype)
    launch = forward_launch(s_rows, q_rows, ways)
    if launch.kernel == "_tiled_fwd_kernel":  # H in a zeroed scratch buffer, two planes
        s_pad = padded_rows(s_rows, dict(launch.constexprs)["ROWS"])
        scratch = torch.zeros(tasks, 2, s_pad, dict(launch.constexprs)["BLOCK_N"],
                              device=z0.device, dtype=torch.float32)
        _tiled_fwd_kernel[(tasks,)](z0, kss, ys, aq, kqs, yq, scratch, h, logits, losses,
                                    s_rows, q_rows, ways, s_pad, steps, lr, **launch.options())
    else:
        _inner_loop_fwd_kernel[(tasks,)](z0, kss, ys, aq, kqs, yq, h, logits, losses,
                                         s_rows, q_rows, ways, steps, lr, **launch.options())
    return h, logits, losses


def inner_loop_reverse(z0, kss, ys, hbar, lr: float, steps: int):
    """Adjoints (of Z0 [T,S,N], of Kss [T,S,S]) given the adjoint of H_K: one kernel launch
    for the reversed loop, then adjoints_from_history (a sum and one GEMM)."""
    tasks, s_rows, ways = z0.shape
    if not kernel_supports(ways) or z0.dtype == torch.float64:
        return torch_inner_loop_reverse(z0, kss, ys, hbar, lr, steps)
    if steps == 0:
        return torch.zeros_like(z0), torch.zeros_like(kss)
    launch = reverse_launch(s_rows, ways)
    consts = dict(launch.constexprs)
    bn = consts["BLOCK_N"]
    tiled = launch.kernel == "_tiled_bwd_kernel"
    s_pad = padded_rows(s_rows, consts["ROWS"]) if tiled else consts["BLOCK_S"]
    # per task: H history (steps + 1 planes tiled, steps planes in registers), P and ZB
    per_task = (3 * steps + 2) * s_pad * bn * 4
    chunk = max(1, min(tasks, SCRATCH_BYTES // per_task))
    z0bar, kssbar = torch.empty_like(z0), torch.empty_like(kss)
    scratch = dict(device=z0.device, dtype=torch.float32)
    for start in range(0, tasks, chunk):  # one launch unless the scratch would exceed 1 GiB
        end = min(tasks, start + chunk)
        count = end - start
        probs = torch.empty(count, s_pad, steps, bn, **scratch)
        zb = torch.empty(count, s_pad, steps, bn, **scratch)
        if tiled:
            hist = torch.zeros(count, s_pad, steps + 1, bn, **scratch)
            hb = torch.zeros(count, s_pad, bn, **scratch)
            hb[:, :s_rows, :ways] = hbar[start:end]
            _tiled_bwd_kernel[(count,)](z0[start:end], kss[start:end], ys[start:end], hist, probs,
                                        hb, zb, s_rows, ways, s_pad, steps, lr, **launch.options())
            hist = hist[:, :, :steps]
        else:
            hist = torch.empty(count, s_pad, steps, bn, **scratch)
            _inner_loop_bwd_kernel[(count,)](z0[start:end], kss[start:end], ys[start:end],
                                             hbar[start:end], hist, probs, zb, s_rows, ways,
                                             steps, lr, **launch.options())
        z0bar[start:end], kssbar[start:end] = adjoints_from_history(zb, hist, s_rows, ways, lr)
    return z0bar, kssbar


def adjoints_from_history(zb, hist, s_rows: int, ways: int, lr: float):
    """Z0's and Kss's adjoints from the per-step histories [T, S_pad, steps, N_pad] of the
    support-logit adjoints ZB_k and the heads H_k (padding zero):
        Z0_bar = sum_k ZB_k,   Kss_bar = -lr sum_k ZB_k H_kᵀ  (one GEMM over k and N)."""
    z0bar = zb.sum(2)[:, :s_rows, :ways]
    kssbar = torch.bmm(zb.flatten(2), hist.flatten(2).transpose(1, 2))[:, :s_rows, :s_rows]
    return z0bar, kssbar.mul_(-lr)


def one_hot(labels, ways, dtype):
    """By comparison: F.one_hot checks its input on the host (a sync under CUDA graphs), and
    an out-of-range label gives a zero row here instead of an error."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


# -- the same loops in batched torch: any shape and dtype; the kernels' test oracle -----------
def query_logits_and_losses(h, aq, kqs, yq, lr: float):
    """Query logits Aq - lr Kqs H [T,Q,N] and each task's mean cross-entropy [T], in torch (a
    GEMM; the Triton kernels fuse it into their launch). Labels out of range weigh nothing here
    (the op turns the task's loss into NaN)."""
    logits = torch.baddbmm(aq, kqs, h, alpha=-lr)
    ways = logits.shape[-1]
    picked = (logits * one_hot(yq, ways, logits.dtype)).sum(-1)
    return logits, (logits.logsumexp(-1) - picked).mean(1)


def torch_inner_loop_forward(z0, kss, ys, aq, kqs, yq, lr: float, steps: int):
    s_rows, ways = z0.shape[1], z0.shape[2]
    y = one_hot(ys, ways, z0.dtype)
    h = torch.zeros_like(z0)
    for _ in range(steps):
        h = h + ((z0 - lr * torch.bmm(kss, h)).softmax(-1) - y) / s_rows
    return (h, *query_logits_and_losses(h, aq, kqs, yq, lr))


def torch_inner_loop_reverse(z0, kss, ys, hbar, lr: float, steps: int):
    s_rows, ways = z0.shape[1], z0.shape[2]
    y = one_hot(ys, ways, z0.dtype)
    heads, probs, h = [], [], torch.zeros_like(z0)
    for _ in range(steps):
        heads.append(h)
        p = (z0 - lr * torch.bmm(kss, h)).softmax(-1)
        probs.append(p)
        h = h + (p - y) / s_rows
    hb, adjoints = hbar, [None] * steps
    for k in reversed(range(steps)):
        p = probs[k]
        adjoints[k] = p * (hb - (p * hb).sum(-1, keepdim=True)) / s_rows
        hb = hb - lr * torch.bmm(kss, adjoints[k])
    if steps == 0:
        return torch.zeros_like(z0), torch.zeros_like(kss)
    return adjoints_from_history(torch.stack(adjoints, 2), torch.stack(heads, 2), s_rows, ways, lr)
