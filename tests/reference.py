"""Plain dense float64 reference merges: the obvious computation every fast path is tested against."""

import torch


def dense(update, names):
    return {n: update.modules[n].delta().double() for n in names if n in update.modules}


def ref_mean(updates, weights):
    names = sorted({n for u in updates for n in u.modules})
    out = {}
    for n in names:
        acc = 0
        for w, u in zip(weights, updates):
            if n in u.modules:
                acc = acc + w * u.modules[n].delta().double()
        out[n] = acc / sum(weights)
    return out


def _kth_largest(values):
    return torch.sort(values.abs().flatten(), descending=True).values


def ref_ties_blocks(blocks, weights, density, per_module, lam=1.0, weighting="agreeing"):
    """TIES over per-update dicts of already-weighted tensors, by sorting and explicit loops. The disjoint mean
    divides by the agreeing updates' weights ("agreeing"), or by their count times the mean of all the weights
    ("all": each update's entries times n·w_i/Σw, averaged over the agreeing ones)."""
    trimmed = []
    for blk in blocks:
        if per_module:
            t = {}
            for n, x in blk.items():
                s = _kth_largest(x)
                k = max(1, round(density * s.numel()))
                t[n] = torch.where(x.abs() >= s[k - 1], x, torch.zeros_like(x))
            trimmed.append(t)
        else:
            s = _kth_largest(torch.cat([x.flatten() for x in blk.values()]))
            k = max(1, round(density * s.numel()))
            trimmed.append({n: torch.where(x.abs() >= s[k - 1], x, torch.zeros_like(x)) for n, x in blk.items()})
    out = {}
    mean_w = sum(weights) / len(weights)
    for n in sorted({n for b in blocks for n in b}):
        items = [(w, t[n]) for w, t in zip(weights, trimmed) if n in t]
        total = sum(x for _, x in items)
        sign = torch.sign(total)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for w, x in items:
            agree = (torch.sign(x) == sign) & (x != 0)
            num[agree] += x[agree]
            den[agree] += w if weighting == "agreeing" else mean_w
        res = torch.zeros_like(total)
        res[den > 0] = num[den > 0] / den[den > 0]
        out[n] = lam * res
    return out


def ref_ties(updates, weights, density=0.2, per_module=False, lam=1.0, weighting="agreeing"):
    blocks = [{n: w * m.delta().double() for n, m in u.modules.items()} for w, u in zip(weights, updates)]
    return ref_ties_blocks(blocks, weights, density, per_module, lam, weighting)


def ref_disjoint_all(deltas, weights):
    """The "all" weighting written out on dense ΔW, untrimmed, entry by entry: the elected sign is that of
    Σ w_i ΔW_i; an entry is the sum of n·w_i/Σw · ΔW_i over the updates that agree with it, over their count."""
    n, total = len(deltas), sum(weights)
    stacked = torch.stack([w * d.double() for w, d in zip(weights, deltas)])
    sign = torch.sign(stacked.sum(0))
    out = torch.zeros_like(stacked[0])
    for idx in torch.cartesian_prod(*(torch.arange(k) for k in out.shape)):
        i = tuple(idx.tolist())
        agreeing = [j for j in range(n) if stacked[j][i] != 0 and torch.sign(stacked[j][i]) == sign[i]]
        if agreeing:
            out[i] = sum(n * weights[j] / total * deltas[j].double()[i] for j in agreeing) / len(agreeing)
    return out


def ref_knots(updates, weights, inner="ties", density=1.0, per_module=False, lam=1.0, rtol=1e-7,
              weighting="agreeing"):
    """Dense SVD of [w_1 ΔW_1 | … | w_n ΔW_n] per module; R_i = Σ V_iᵀ; merge; U · R."""
    names = sorted({n for u in updates for n in u.modules})
    bases, blocks = {}, [{} for _ in updates]
    for n in names:
        idx = [i for i, u in enumerate(updates) if n in u.modules]
        cat = torch.cat([weights[i] * updates[i].modules[n].delta().double() for i in idx], 1)
        U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
        k = int((S > rtol * S[0]).sum())
        bases[n] = U[:, :k]
        cols = updates[idx[0]].modules[n].shape[1]
        for j, i in enumerate(idx):
            blocks[i][n] = S[:k, None] * Vh[:k, j * cols : (j + 1) * cols]
    if inner == "mean":
        merged = {n: sum(b[n] for b in blocks if n in b) / sum(weights) for n in names}
    else:
        merged = ref_ties_blocks(blocks, weights, density, per_module, weighting=weighting)
    return {n: lam * bases[n] @ merged[n] for n in names}
