"""Slow per-unit reference implementations of the DLB rules, written straight from the spec.

Everything here loops over units in float64 numpy, exactly as ../shared/spec/dlb_rules.md §2.1 and
§3.2 state the rules for one unit, so the vectorised GEMM forms in dlbjax.rules can be checked
against them (spec §7.2 items 10 and 14).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Gate:
    lower: Optional[float] = None
    upper: Optional[float] = None
    fn: Optional[Callable] = None
    tol: float = 1e-5


def unit_default(x, w, b, R, gate: Optional[Gate] = None):
    """One affine unit, default mode (§2.1). Returns (R_in, bias share)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    z = w * x
    P = z[z > 0].sum()
    N = -z[z < 0].sum()
    T = P - N + b
    gp = gn = True
    if gate is not None:
        if gate.lower is not None and T < gate.lower:
            gp = False
        if gate.upper is not None and T > gate.upper:
            gn = False
        if gate.fn is not None and P > 0 and N > 0:
            f = gate.fn
            if abs(f(T) - f(P + max(b, 0))) <= gate.tol:
                gn = False
            elif abs(f(T) - f(-(N + max(-b, 0)))) <= gate.tol:
                gp = False
    Pt = P if gp else 0.0
    Nt = N if gn else 0.0
    D = Pt + Nt + abs(b)
    out = np.zeros_like(z)
    if D == 0:
        return out, 0.0
    for i, zi in enumerate(z):
        if zi > 0 and Pt > 0:
            out[i] = R * zi / D
        elif zi < 0 and Nt > 0:
            out[i] = R * -zi / D
    return out, R * abs(b) / D


def unit_contrastive(x, w, b, Rp, Rn):
    """One affine unit, contrastive mode (§3.2). Returns (R+_in, R-_in)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    z = w * x
    P = z[z > 0].sum()
    N = -z[z < 0].sum()
    T = P - N + b
    pos_share = np.where(z > 0, z, 0) / P if P > 0 else np.zeros_like(z)
    neg_share = np.where(z < 0, -z, 0) / N if N > 0 else np.zeros_like(z)
    if P > 0 and N == 0:
        return Rp * pos_share, Rn * pos_share
    if N > 0 and P == 0:
        return Rp * neg_share, Rn * neg_share
    if P == 0 and N == 0:
        return np.zeros_like(z), np.zeros_like(z)
    if T == 0:
        return np.zeros_like(z), np.zeros_like(z)
    aligned = np.sign(T) == np.sign(Rp - Rn)
    if aligned:
        return Rp * pos_share, Rn * neg_share
    return Rp * neg_share, Rn * pos_share


def dense_default(x, W, b, R, gate=None):
    """All units of y = W x + b (x [I], W [O, I], R [O]). Returns (R_in, total bias share)."""
    out, kept = np.zeros(len(x)), 0.0
    for j in range(W.shape[0]):
        r, k = unit_default(x, W[j], 0.0 if b is None else b[j], R[j], gate)
        out += r
        kept += k
    return out, kept


def dense_contrastive(x, W, b, Rp, Rn):
    pos, neg = np.zeros(len(x)), np.zeros(len(x))
    for j in range(W.shape[0]):
        p, n = unit_contrastive(x, W[j], 0.0 if b is None else b[j], Rp[j], Rn[j])
        pos += p
        neg += n
    return pos, neg


def conv_units(x, w, stride, padding, dilation, groups):
    """Enumerate the units of a PyTorch-layout convolution (x [C, *S], w [O, C/g, *K]).

    Yields (out_index tuple (o, *spatial), list of input flat indices or -1 for padding, weights).
    """
    nd = w.ndim - 2
    C = x.shape[0]
    O = w.shape[0]
    cg, og = C // groups, O // groups
    spatial = x.shape[1:]
    k = w.shape[2:]
    out_sp = [(spatial[a] + 2 * padding[a] - dilation[a] * (k[a] - 1) - 1) // stride[a] + 1
              for a in range(nd)]
    for o in range(O):
        g = o // og
        for pos in itertools.product(*[range(n) for n in out_sp]):
            idx, ws = [], []
            for c in range(cg):
                for kk in itertools.product(*[range(n) for n in k]):
                    coords = [pos[a] * stride[a] - padding[a] + kk[a] * dilation[a] for a in range(nd)]
                    inside = all(0 <= coords[a] < spatial[a] for a in range(nd))
                    flat = -1
                    if inside:
                        flat = np.ravel_multi_index((g * cg + c, *coords), x.shape)
                    idx.append(flat)
                    ws.append(w[(o, c) + kk])
            yield (o, *pos), np.array(idx), np.array(ws, np.float64)


def conv_default(x, w, b, R, stride, padding, dilation, groups, gate=None):
    """Default rule of a convolution as the dense rule over every receptive-field patch
    (padding cells have z = 0 and are cropped)."""
    out = np.zeros(x.size)
    kept = 0.0
    flat_x = x.reshape(-1)
    for (o, *pos), idx, ws in conv_units(x, w, stride, padding, dilation, groups):
        patch = np.where(idx >= 0, flat_x[np.maximum(idx, 0)], 0.0)
        r, k = unit_default(patch, ws, 0.0 if b is None else b[o], R[(o, *pos)], gate)
        np.add.at(out, idx[idx >= 0], r[idx >= 0])
        kept += k
    return out.reshape(x.shape), kept


def conv_contrastive(x, w, b, Rp, Rn, stride, padding, dilation, groups):
    pos_out, neg_out = np.zeros(x.size), np.zeros(x.size)
    flat_x = x.reshape(-1)
    for (o, *pos), idx, ws in conv_units(x, w, stride, padding, dilation, groups):
        patch = np.where(idx >= 0, flat_x[np.maximum(idx, 0)], 0.0)
        p, n = unit_contrastive(patch, ws, 0.0 if b is None else b[o], Rp[(o, *pos)], Rn[(o, *pos)])
        np.add.at(pos_out, idx[idx >= 0], p[idx >= 0])
        np.add.at(neg_out, idx[idx >= 0], n[idx >= 0])
    return pos_out.reshape(x.shape), neg_out.reshape(x.shape)


def pool_windows_2d(H, W, kernel, stride, padding, dilation, ceil_mode):
    """PyTorch max/avg pool windows over an H x W plane: list of (out (i, j), [flat cells])."""
    def out_size(L, k, s, p, d):
        span = L + 2 * p - d * (k - 1) - 1
        n = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (n - 1) * s >= L + p:
            n -= 1
        return n

    oh = out_size(H, kernel[0], stride[0], padding[0], dilation[0])
    ow = out_size(W, kernel[1], stride[1], padding[1], dilation[1])
    wins = []
    for i in range(oh):
        for j in range(ow):
            cells = []
            for a in range(kernel[0]):
                for c in range(kernel[1]):
                    r = i * stride[0] - padding[0] + a * dilation[0]
                    q = j * stride[1] - padding[1] + c * dilation[1]
                    if 0 <= r < H and 0 <= q < W:
                        cells.append(r * W + q)
            wins.append(((i, j), cells))
    return (oh, ow), wins


def max_pool_reference(x, R, kernel, stride, padding, dilation, ceil_mode):
    """x [C, H, W]: window maxima share each window's relevance, ties split evenly (§8.6)."""
    C, H, W = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    _, wins = pool_windows_2d(H, W, kernel, stride, padding, dilation, ceil_mode)
    for c in range(C):
        plane = x[c].reshape(-1)
        acc = out[c].reshape(-1)
        for (i, j), cells in wins:
            vals = plane[cells]
            winners = [cells[k] for k in range(len(cells)) if vals[k] == vals.max()]
            for cell in winners:
                acc[cell] += R[c, i, j] / len(winners)
        out[c] = acc.reshape(H, W)
    return out


def avg_pool_reference(x, R, kernel, stride, padding, ceil_mode):
    """x [C, H, W]: each window's relevance split over its cells in proportion to |x| (§8.7)."""
    C, H, W = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    _, wins = pool_windows_2d(H, W, kernel, stride, padding, (1, 1), ceil_mode)
    for c in range(C):
        plane = x[c].reshape(-1)
        acc = out[c].reshape(-1)
        for (i, j), cells in wins:
            mags = np.abs(plane[cells])
            if mags.sum() > 0:
                for cell, m in zip(cells, mags):
                    acc[cell] += R[c, i, j] * m / mags.sum()
        out[c] = acc.reshape(H, W)
    return out


def zplus_mlp(x, weights, seed_row):
    """LRP z+ (alpha1-beta0, bias ignored) through a bias-free ReLU MLP: R_i = sum_j x_i w_ji+ /
    sum_k x_k w_jk+ R_j for the positive parts (x >= 0 after the first layer)."""
    acts = [np.asarray(x, np.float64)]
    for k, W in enumerate(weights):
        h = W @ acts[-1]
        acts.append(np.maximum(h, 0) if k < len(weights) - 1 else h)
    R = np.asarray(seed_row, np.float64)
    for k in range(len(weights) - 1, -1, -1):
        a, W = acts[k], weights[k]
        z = W * a[None, :]
        zp = np.where(z > 0, z, 0)
        s = zp.sum(1)
        R = (zp / np.where(s > 0, s, 1)[:, None] * np.where(s > 0, R, 0)[:, None]).sum(0)
    return R


def bilinear_reference(a, b, R, fa, fb):
    """C = a @ b (batched): each C[t, e] is a bias-free unit over k with contributions
    a[t, k] b[k, e]; its relevance is shared over k in proportion to |a b| and each pair's share is
    split (fa, fb) between the two factors (§4.9 step 4, §4.11)."""
    ra, rb = np.zeros(a.shape), np.zeros(b.shape)
    for n in range(a.shape[0]):
        for t in range(a.shape[1]):
            for e in range(b.shape[2]):
                z = np.abs(a[n, t, :] * b[n, :, e])
                if z.sum() == 0:
                    continue
                share = R[n, t, e] * z / z.sum()
                ra[n, t, :] += fa * share
                rb[n, :, e] += fb * share
    return ra, rb
