"""Channel selection and least-squares reconstruction in Gram form.

A consumer layer's output (minus bias) at a sampled (filter, position) is the
sum of per-input-channel contributions: y_n = sum_c X[n, c].  Everything the
selectors need is in G = X^T X (C x C): the error of removing a set T is
||X 1_T||^2 = 1_T' G 1_T, and the least-squares rescale of a kept set S is
w = G_SS^-1 (G 1)_S.  Accumulating G while sampling keeps memory at C^2
whatever the number of samples, and makes each greedy step O(C).

Several consumers of one channel group (a residual stream) are weighed
jointly by adding their Grams, each divided by its own output energy 1'G1.
"""
import numpy as np


class GramAccumulator:
    """Running X^T X over sample batches (float64)."""

    def __init__(self, channels):
        self.G = np.zeros((channels, channels))
        self.samples = 0

    def add(self, X):
        X = np.asarray(X, dtype=np.float64)
        self.G += X.T @ X
        self.samples += X.shape[0]
        return self


def energy(G):
    """||y||^2 of the full output: 1' G 1."""
    return float(G.sum())


def joint_gram(grams):
    """Sum of Grams, each normalised by its consumer's output energy."""
    total = None
    for G in grams:
        e = energy(G)
        part = G / e if e > 0 else G
        total = part if total is None else total + part
    return total


def removal_error(G, removed):
    """||sum of removed contributions||^2 = 1_T' G 1_T."""
    t = np.zeros(G.shape[0])
    t[list(removed)] = 1.0
    return float(t @ G @ t)


def remove_greedy(G, n_remove):
    """ThiNet (ICCV 2017): repeatedly remove the channel that keeps the
    removed set's summed contribution smallest.  Returns removed indices in
    the order chosen.  Each step is O(C): v = G 1_T is updated, not recomputed.
    """
    C = G.shape[0]
    if not 0 <= n_remove < C:
        raise ValueError("can remove 0..%d of %d channels, not %d" % (C - 1, C, n_remove))
    diag = np.diag(G).copy()
    v = np.zeros(C)            # G 1_T
    available = np.ones(C, dtype=bool)
    removed = []
    for _ in range(n_remove):
        # error(T + c) - error(T) = 2 v_c + G_cc
        cost = np.where(available, 2.0 * v + diag, np.inf)
        c = int(np.argmin(cost))
        removed.append(c)
        available[c] = False
        v += G[:, c]
    return removed


def add_greedy(G, n_keep, ridge=1e-8):
    """Forward selection with least-squares refit (the other ThiNet variant):
    repeatedly add the channel that most lowers the refitted residual
    ||y - X_S w||^2.  Orthogonalisation in the G inner product makes a step
    O(C |S|).  Returns kept indices in the order chosen.
    """
    C = G.shape[0]
    if not 0 < n_keep <= C:
        raise ValueError("can keep 1..%d of %d channels, not %d" % (C, C, n_keep))
    G = G + ridge * np.trace(G) / C * np.eye(C)
    b = G.sum(axis=1)          # X' y with y = X 1
    # Q rows: G-orthonormal basis of the chosen columns, projected onto all C.
    P = np.zeros((0, C))       # P[j] = <q_j, e_c>_G for every c
    resid_b = b.copy()         # b_c - sum_j P[j,c] <q_j, y>
    norm2 = np.diag(G).copy()  # G_cc - sum_j P[j,c]^2
    chosen = []
    available = np.ones(C, dtype=bool)
    for _ in range(n_keep):
        gain = np.where(available & (norm2 > 1e-12 * np.diag(G).max()), resid_b ** 2 / np.maximum(norm2, 1e-300), -np.inf)
        if not np.isfinite(gain).any():
            gain = np.where(available, 0.0, -np.inf)   # the rest is linearly dependent
        c = int(np.argmax(gain))
        chosen.append(c)
        available[c] = False
        # new basis vector q = (e_c - sum_j P[j,c] q_j) / sqrt(norm2_c)
        scale = np.sqrt(max(norm2[c], 1e-300))
        p = (G[c] - P[:, c] @ P) / scale
        y_coef = resid_b[c] / scale
        P = np.vstack([P, p])
        resid_b -= p * y_coef
        norm2 -= p ** 2
    return chosen


def least_squares_scale(G, kept, ridge=1e-8):
    """w = argmin ||y - X_S w||^2 for the kept channels S (y = X 1)."""
    kept = np.asarray(kept)
    Gss = G[np.ix_(kept, kept)]
    rhs = G[kept].sum(axis=1)
    reg = ridge * (np.trace(Gss) / max(len(kept), 1) + 1e-30)
    return np.linalg.solve(Gss + reg * np.eye(len(kept)), rhs)


def residual(G, kept, w=None):
    """||y - X_S w||^2 (w = ones: plain removal)."""
    kept = np.asarray(kept)
    w = np.ones(len(kept)) if w is None else np.asarray(w)
    u = -np.ones(G.shape[0])
    u[kept] += w
    return float(u @ G @ u)


def lasso_gram(G, alpha, beta=None, sweeps=200, tol=1e-7):
    """min_b 1/2 b'Gb - (G1)'b + alpha ||b||_1 by coordinate descent on G."""
    C = G.shape[0]
    b = G.sum(axis=1)
    beta = np.zeros(C) if beta is None else beta.copy()
    diag = np.maximum(np.diag(G), 1e-30)
    grad_part = G @ beta
    for _ in range(sweeps):
        biggest = 0.0
        for c in range(C):
            old = beta[c]
            rho = b[c] - grad_part[c] + diag[c] * old
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / diag[c]
            if new != old:
                grad_part += G[:, c] * (new - old)
                beta[c] = new
                biggest = max(biggest, abs(new - old))
        if biggest < tol * (np.abs(beta).max() + 1e-30):
            break
    return beta


def lasso_select(G, n_keep, iters=40):
    """He et al. 2017: bisection on alpha until LASSO keeps n_keep channels.

    Returns kept indices (the n_keep largest |beta| at the alpha found, so the
    count is exact even when no alpha gives it exactly).
    """
    C = G.shape[0]
    if not 0 < n_keep <= C:
        raise ValueError("can keep 1..%d of %d channels, not %d" % (C, C, n_keep))
    lo, hi = 0.0, float(np.abs(G.sum(axis=1)).max())   # hi: every beta is 0
    beta = np.zeros(C)
    best = None
    for _ in range(iters):
        alpha = 0.5 * (lo + hi)
        beta = lasso_gram(G, alpha, beta)
        nz = int((beta != 0).sum())
        if nz >= n_keep:
            best = beta.copy()
            lo = alpha
            if nz == n_keep:
                break
        else:
            hi = alpha
    if best is None:
        best = lasso_gram(G, 0.0)
    order = np.argsort(-np.abs(best), kind="stable")
    return sorted(int(c) for c in order[:n_keep])
