"""``joint_newton``: damped Newton steps on the GLMM's negative log joint, matrix-free.

The objective is the one of ``joint_gd`` (:func:`spatialscale.glmm.objective.neg_log_joint`).
Split the parameters of a gene into ``u = (nu, bias, beta)`` (``n q + (F + 1) q``
values) and the learnt variance parameters ``phi`` (``theta_logit``, and
``sigma`` unless it is fixed).  The Hessian of the negative log joint is::

    [ H_uu     B   ]   H_uu = [[W + C^-1, W X1], [X1' W, X1' W X1]]   (never formed)
    [ B'     D_phi ]   B    = [d(C^-1 nu) / d phi ; 0]
                       D_phi = d^2 (variance terms) / d phi^2

with ``W`` the per-spot multinomial blocks ``N_i (diag p_i - p_i p_i')``,
``C^-1`` applied through the kernel's eigenpairs (plus the isotropic
remainder of a low-rank kernel) and ``X1 = [1, design]`` (Kronecker with
``I_q``).  ``H_uu`` is positive definite.  The Newton step solves ``H_uu`` for
the gradient and the (one or two) columns of ``B`` at once by batched
preconditioned conjugate gradients, in the coordinates ``(t, w)`` with
``t = nu + X1 w`` (:class:`TWOperators`: there the intercepts' near-confounding
with the mean of ``nu`` costs no cancellation, which float32 needs).  The
preconditioner inverts that matrix exactly after replacing ``W + C^-1`` by
per-spot blocks, or by its eigenbasis form with ``W`` averaged over spots,
whichever neglects less for the gene (:class:`RandomEffectPreconditioner`),
plus a Schur complement over the fixed effects.  Then comes the small Schur
system ``S = D_phi - B' H_uu^-1 B`` of the variance parameters; where ``S`` is
not positive definite (the joint is not convex in them) its eigenvalues are
replaced by their absolute values, which keeps the step a descent direction.
The PCG tolerance follows the gradient (inexact Newton).  A per-gene
backtracking (Armijo) line search then only accepts steps that lower the
loss.  Nothing is ``n q x n q``: memory and time per PCG iteration are linear
in ``n`` times the kernel rank, and everything is batched tensor operations
over the genes (no per-gene loops), for thousands of spots, on CPU or GPU.

``theta_logit`` is kept in ``[-10, 10]`` (:data:`THETA_LOGIT_BOUND`): with a
low-rank kernel the joint decreases without bound as ``theta -> 1`` (the
remainder's variance ``sigma^2 (1 - theta)`` vanishes), and a Newton method,
unlike slow Adam steps, would follow it; at a bound that the step pushes
against, ``theta_logit`` is held for that step.

The helpers :func:`prior_precision`, :func:`apply_precision`,
:func:`weight_blocks` and :func:`pcg` are shared with
:mod:`spatialscale.glmm.marginal` and the adjusted score test.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from spatialscale.glmm.config import VAR_FLOOR, GLMMConfig
from spatialscale.glmm.objective import loss_and_gradients, neg_log_joint, project, variance_terms
from spatialscale.glmm.state import PerGeneStopping, pack_fit, setup_fit

__all__ = ["apply_blocks", "apply_precision", "fit_joint_newton", "joint_hessian_vector", "line_search",
           "newton_direction", "pcg", "precision_diagonal", "PrecisionOperators", "prior_precision",
           "RandomEffectPreconditioner", "TWOperators", "weight_blocks"]

#: relative residual at which a conjugate-gradient column stops, by dtype
CG_TOL = {"float32": 1e-5, "float64": 1e-9}
#: conjugate-gradient iterations at most per solve
CG_MAX_ITER = 500
#: eigenvalues of the Schur complement below this fraction of the largest are dropped (pseudo-inverse)
_RCOND = 1e-10
#: relative ridge on the fixed effects' block (designs collinear with the intercept)
_RIDGE = 1e-6
#: ``|theta_logit|`` is kept at most this (theta within 4.5e-5 of 0 and 1): with a low-rank kernel the joint is
#: unbounded below as theta -> 1 (the isotropic remainder's variance sigma^2 (1 - theta) -> 0)
THETA_LOGIT_BOUND = 10.0
#: Armijo sufficient-decrease constant and the backtracking halvings at most
_ARMIJO = 1e-4
_MAX_HALVINGS = 30


def prior_precision(theta_logit, sigma, data: dict, cfg, q: int):
    """Factors of the random effect's precision, ``C_k^-1 = V diag(a_k) V' + e_k I`` per logit ``k``.

    Parameters
    ----------
    theta_logit, sigma
        ``(B, v)`` variance parameters (``v`` is 1 or ``q``); differentiable.
    data
        Holds ``eigvals (r,)`` and ``eigvecs (n, r)`` for ``glmm-full``.
    cfg
        :class:`~spatialscale.glmm.config.GLMMConfig`.
    q
        Logits per gene.

    Returns
    -------
    a, e
        ``a`` ``(B, q, r)`` (``None`` for ``glmm-null``, whose precision is
        ``I / sigma^2``) and ``e`` ``(B, q)``.  With covariance eigenvalues
        ``c = sigma^2 (theta lambda + 1 - theta)`` and remainder
        ``d = sigma^2 (1 - theta)``: ``a = 1/c - 1/d``, ``e = 1/d`` for a
        low-rank kernel and ``a = 1/c``, ``e = 0`` for the full one.
    """
    import torch


    b = sigma.shape[0]
    var = torch.clamp(sigma**2, min=VAR_FLOOR)
    var = var.expand(b, q) if var.shape[1] == 1 else var
    if cfg.model == "glmm-null":
        return None, 1.0 / var
    theta = torch.sigmoid(theta_logit)
    theta = theta.expand(b, q) if theta.shape[1] == 1 else theta
    lam = data["eigvals"]
    inv_c = 1.0 / (var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None]))
    if lam.shape[0] < data["eigvecs"].shape[0]:
        inv_d = 1.0 / (var * (1.0 - theta))
        return inv_c - inv_d[..., None], inv_d
    return inv_c, torch.zeros_like(var)


def apply_precision(v, vec, a, e):
    """``C^-1 v`` for ``v`` ``(B, n, q, k)`` (``k`` columns), from :func:`prior_precision`'s factors."""
    out = e[:, None, :, None] * v
    if a is None:
        return out
    return out + _back(vec, a.transpose(1, 2)[..., None] * _project(vec, v))


_SQUARED: tuple = (lambda: None, None)  # the last eigenbasis squared: (weak reference to it, its square)


def _squared_eigvecs(vec):
    """``vec**2``, kept for the last eigenbasis seen (each epoch's preconditioner needs it again)."""
    global _SQUARED
    ref, sq = _SQUARED  # one tuple: a thread reads a consistent pair
    if ref() is not vec:
        sq = vec**2
        _SQUARED = (weakref.ref(vec), sq)
    return sq


def precision_diagonal(vec, a, e, n: int):
    """Diagonal of ``C^-1`` per logit: ``(B, n, q)``."""
    if a is None:
        return e[:, None, :].expand(-1, n, -1)
    b, q, r = a.shape
    # one GEMM over every gene and logit (a batched product of (n, r) by (r, q) blocks is several times slower)
    return (_squared_eigvecs(vec) @ a.reshape(b * q, r).T).reshape(n, b, q).permute(1, 0, 2) + e[:, None, :]


def weight_blocks(probs_q, totals):
    """Per-spot multinomial information ``N_i (diag p_i - p_i p_i')``: ``(B, n, q, q)``.

    ``probs_q`` ``(B, n, q)`` are the probabilities of the non-reference isoforms.
    """
    import torch

    return totals[..., None, None] * (torch.diag_embed(probs_q) - probs_q[..., :, None] * probs_q[..., None, :])


def apply_blocks(blocks, v):
    """Per-spot ``(q, q)`` blocks times ``v``: ``(B, n, q, q)``, ``(B, n, q, k)`` -> ``(B, n, q, k)``.

    An einsum: for a handful of logits it is much faster than a batched matmul of tiny matrices.
    """
    import torch

    return torch.einsum("bnij,bnjk->bnik", blocks, v)


def pcg(matvec: Callable, rhs, precond: Callable, *, tol, max_iter: int = CG_MAX_ITER,
        restrict: Callable | None = None, rows: int | None = None):
    """Preconditioned conjugate gradients for ``A x = rhs``, every gene and column on its own.

    Parameters
    ----------
    matvec, precond
        ``v -> A v`` and ``v -> M^-1 v`` on ``(B, N, k)`` tensors, ``A`` and
        ``M`` symmetric positive definite per gene.
    rhs
        ``(B, N, k)`` right-hand sides (``k`` columns per gene).
    tol
        Relative residual, a float or one per gene ``(B,)``.  A column stops
        (and is not touched again) once its residual norm is at most ``tol``
        times that of its right-hand side, so its solution does not depend on
        the other columns or genes of the batch.
    max_iter
        Iterations at most.
    restrict
        ``genes -> (matvec, precond)`` for the genes ``genes`` (a LongTensor of
        batch positions) alone.  Given, the iteration drops the genes whose
        columns have all stopped once they are half of those still iterated,
        so a batch costs about the sum of its genes' iterations rather than
        the most any gene needs.
    rows
        The first ``rows`` rows are the system's unknowns; the others are
        carried along by the linear updates (products the operators reuse,
        e.g. :class:`TWOperators`' ``V' t``) and left out of inner products
        and norms.  ``None``: all rows.

    Returns
    -------
    x, iterations
        ``(B, N, k)`` solutions and ``(B, k)`` iterations used per column.
    """
    import torch

    rows = rhs.shape[1] if rows is None else int(rows)

    def dot(u, v):
        return (u[:, :rows] * v[:, :rows]).sum(1)

    tol = torch.as_tensor(tol, dtype=rhs.dtype, device=rhs.device)
    tol = tol[:, None] if tol.dim() == 1 else tol
    bnorm = rhs[:, :rows].norm(dim=1)
    tol = tol.expand_as(bnorm)
    x = torch.zeros_like(rhs)
    x_out = torch.zeros_like(rhs)
    r = rhs.clone()
    done = bnorm <= 0
    z = precond(r)
    p = z.clone()
    rz = dot(r, z)
    iters = torch.zeros(bnorm.shape, dtype=torch.int64, device=rhs.device)
    iters_out = iters.clone()
    genes = torch.arange(rhs.shape[0], device=rhs.device)  # batch positions of the rows iterated
    for _ in range(max_iter):
        if bool(done.all()):
            break
        if restrict is not None:
            live = ~done.all(1)
            if 2 * int(live.sum()) <= live.numel():  # drop the finished genes
                fin = ~live
                x_out[genes[fin]] = x[fin]
                iters_out[genes[fin]] = iters[fin]
                keep = live.nonzero()[:, 0]
                genes = genes[keep]
                x, r, p, rz, done, bnorm, tol, iters = (t[keep] for t in (x, r, p, rz, done, bnorm, tol, iters))
                matvec, precond = restrict(genes)
        ap = matvec(p)
        pap = dot(p, ap)
        go = ~done & (pap > 0)
        alpha = torch.where(go, rz / torch.where(go, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = x + alpha[:, None, :] * p
        r = r - alpha[:, None, :] * ap
        iters += go.long()
        done = done | ~go | (r[:, :rows].norm(dim=1) <= tol * bnorm)
        z = precond(r)
        rz_new = dot(r, z)
        beta = torch.where(done, torch.zeros_like(rz), rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)))
        p = torch.where(done[:, None, :], p, z + beta[:, None, :] * p)
        rz = torch.where(done, rz, rz_new)
    x_out[genes] = x
    iters_out[genes] = iters
    return x_out, iters_out


def _phi_names(learn: list[str]) -> list[str]:
    return [k for k in ("theta_logit", "sigma") if k in learn]


def _newton_system(params: dict, data: dict, cfg, learn: list[str]) -> dict:
    """Loss, gradient and Hessian pieces of the negative log joint at ``params``.

    Returns a dict with ``loss (B,)``, the gradients ``g_nu (B, n, q)``,
    ``g_w (B, (F + 1) q)`` (``bias`` then ``beta``) and ``g_phi (B, m)``,
    ``blocks`` (``W``, ``(B, n, q, q)``), ``a``/``e``
    (:func:`prior_precision`), ``x1`` (``[1, design]``), ``prior_grad``
    (``C^-1 nu``), ``cols_phi`` (``d(C^-1 nu)/d phi``, ``(B, n, q, m)``),
    ``d_phi`` (``(B, m, m)``) and ``phi`` (names).
    """
    import torch


    nu = params["nu"]
    b, n, q = nu.shape
    phi = _phi_names(learn)
    parts: dict = {}  # V' nu and C^-1 nu, computed once for the gradient and reused below
    loss, grads = loss_and_gradients(params, data, cfg, ["nu", "bias", "beta"], parts=parts)
    x1 = torch.cat([torch.ones(n, 1, dtype=nu.dtype, device=nu.device), data["x"]], dim=1)  # (n, F+1)
    small = {k: params[k].detach().clone().requires_grad_(k in phi) for k in ("theta_logit", "sigma")}
    a, e = prior_precision(small["theta_logit"], small["sigma"], data, cfg, q)
    vec = data.get("eigvecs")
    with torch.no_grad():
        eta = nu + params["bias"][:, None, :] + torch.einsum("nf,bfq->bnq", data["x"], params["beta"])
        probs = torch.softmax(torch.cat([eta, torch.zeros_like(eta[..., :1])], -1), -1)[..., :q]
        a_d = None if a is None else a.detach()
        out = {"loss": loss, "g_nu": grads["nu"], "g_w": torch.cat([grads["bias"], grads["beta"].reshape(b, -1)], 1),
               "blocks": weight_blocks(probs, data["totals"]), "a": a_d, "e": e.detach(), "x1": x1,
               "prior_grad": parts["prior_grad"], "phi": phi,
               "g_phi": None, "d_phi": None, "cols_phi": nu.new_zeros(b, n, q, 0)}
    if not phi:
        return out

    # the variance parameters: gradient, Hessian and d(C^-1 nu)/d phi from autograd on small tensors
    quad_proj, quad_rest = parts["quad_proj"], parts["quad_rest"]
    leaves = [small[k] for k in phi]
    var_loss = variance_terms(small["theta_logit"], small["sigma"], quad_proj, quad_rest, data, cfg, q, n)
    g_phi = torch.cat(torch.autograd.grad(var_loss.sum(), leaves, create_graph=True, allow_unused=True,
                                          materialize_grads=True), dim=1)  # (B, m)
    rows = [torch.cat(torch.autograd.grad(g_phi[:, j].sum(), leaves, retain_graph=True, allow_unused=True,
                                          materialize_grads=True), 1)
            if g_phi.requires_grad else torch.zeros_like(g_phi) for j in range(g_phi.shape[1])]
    tangents = []
    for k in phi:  # forward-mode derivative of the factors (a, e) along each variance parameter
        for c in range(params[k].shape[1]):
            tangent = torch.zeros_like(params[k])
            tangent[:, c] = 1.0

            def factors(t, k=k):
                args = {**{name: small[name].detach() for name in ("theta_logit", "sigma")}, k: t}
                fa, fe = prior_precision(args["theta_logit"], args["sigma"], data, cfg, q)
                return (fe,) if fa is None else (fa, fe)

            # torch.autograd.functional.jvp (double backward), not torch.func.jvp: forward-mode AD
            # levels are process-global and break when two threads (batches) fit at once
            _, tang = torch.autograd.functional.jvp(factors, (params[k].detach(),), (tangent,))
            tangents.append((None, tang[0]) if len(tang) == 1 else tang)
    out.update(g_phi=g_phi.detach(), d_phi=torch.stack(rows, 1).detach(),
               cols_phi=_precision_tangents(vec, parts["proj"], nu.detach(), tangents))
    return out


def _precision_tangents(vec, proj, nu, tangents: list):
    """``(dC^-1/dphi_j) nu`` for each tangent ``(da_j, de_j)`` of the factors: ``(B, n, q, m)``.

    With ``proj = V' nu`` already at hand, all of them take one GEMM.
    """
    import torch

    de = torch.stack([t[1] for t in tangents], -1)  # (B, q, m)
    out = de[:, None] * nu[..., None]
    if tangents[0][0] is None:  # glmm-null: C^-1 is diagonal
        return out
    w = torch.stack([t[0] for t in tangents], -1) * proj[..., None]  # (B, q, r, m)
    return out + _back(vec, w.transpose(1, 2))


def _project(vec, v):
    """``V' v``: ``(n, r)``, ``(B, n, q, k)`` -> ``(B, r, q, k)``, one GEMM."""
    b, n, q, k = v.shape
    return (vec.T @ v.permute(1, 0, 2, 3).reshape(n, -1)).reshape(-1, b, q, k).permute(1, 0, 2, 3)


def _back(vec, w):
    """``V w``: ``(n, r)``, ``(B, r, q, k)`` -> ``(B, n, q, k)``, one GEMM."""
    b, r, q, k = w.shape
    return (vec @ w.permute(1, 0, 2, 3).reshape(r, -1)).reshape(-1, b, q, k).permute(1, 0, 2, 3)


def _take(x, genes):
    """Rows ``genes`` of a per-gene tensor (``None`` stays ``None``)."""
    return None if x is None else x[genes]


class RandomEffectPreconditioner:
    """A preconditioner ``v -> M^-1 v`` for ``W + C^-1`` on ``(B, n, q, k)`` tensors, chosen per gene.

    Per-spot blocks ``(W_i + diag(C^-1)_ii)^-1`` are exact when ``C^-1`` is
    diagonal (little spatial variance, ``glmm-null``); the eigenbasis inverse
    of ``I (x) W_bar + C^-1`` (``W_bar`` the spot average of the ``W_i``) is
    exact when the spots weigh alike.  Each gene takes the one whose neglected
    part is smaller in Frobenius norm: the off-diagonal of ``C^-1`` against the
    spread of the ``W_i`` about their mean.  Everything is kept per gene, so
    :meth:`subset` (PCG dropping converged genes) only indexes.

    Parameters
    ----------
    blocks
        ``W_i`` ``(B, n, q, q)``.
    vec, a, e
        The eigenbasis and the factors of :func:`prior_precision`.
    """

    def __init__(self, blocks, vec, a, e, *, _parts: dict | None = None) -> None:
        import torch

        self.vec = vec
        if _parts is not None:
            self.parts = _parts
        else:
            b, n, q, _ = blocks.shape
            diag = precision_diagonal(vec, a, e, n)
            parts = {"spot": torch.linalg.inv(blocks + torch.diag_embed(diag)),
                     "use_eigen": torch.zeros(b, dtype=torch.bool, device=blocks.device), "inv_k": None,
                     "inv_rest": None}
            if a is not None:
                r = vec.shape[1]
                frob2 = ((a + e[..., None]) ** 2).sum(-1) + (n - r) * e**2  # ||C^-1||_F^2 per logit
                off2 = (frob2 - (diag**2).sum(1)).sum(-1)
                wbar = blocks.mean(1)  # (B, q, q)
                parts["use_eigen"] = off2 > ((blocks - wbar[:, None]) ** 2).sum((1, 2, 3))
                inv_k = torch.linalg.inv(wbar[:, None] + torch.diag_embed((a + e[..., None]).transpose(1, 2)))
                if r < n:  # the remainder's directions
                    parts["inv_rest"] = torch.linalg.inv(wbar + torch.diag_embed(e))
                    inv_k = inv_k - parts["inv_rest"][:, None]
                parts["inv_k"] = inv_k  # (B, r, q, q)
            self.parts = parts
        self.eigen_idx = self.parts["use_eigen"].nonzero()[:, 0]
        self.spot_idx = (~self.parts["use_eigen"]).nonzero()[:, 0]

    def subset(self, genes) -> RandomEffectPreconditioner:
        """The preconditioner of the genes ``genes`` (batch positions) alone."""
        return RandomEffectPreconditioner(None, self.vec, None, None,
                                          _parts={k: _take(v, genes) for k, v in self.parts.items()})

    def _eigen(self, v, proj):
        """The eigenbasis inverse of the eigen genes ``v`` ``(E, n, q, k)``; returns it and its ``V'``."""
        import torch

        idx, vec = self.eigen_idx, self.vec
        proj = _project(vec, v) if proj is None else proj
        y = torch.einsum("brij,brjk->brik", self.parts["inv_k"][idx], proj)
        out = _back(vec, y)
        inv_rest = self.parts["inv_rest"]
        if inv_rest is not None:
            out = out + torch.einsum("bij,bnjk->bnik", inv_rest[idx], v)
            y = y + torch.einsum("bij,brjk->brik", inv_rest[idx], proj)
        return out, y

    def __call__(self, v, proj=None, with_proj: bool = False):
        """``M^-1 v``; ``proj = V' v`` ``(B, r, q, k)`` where known; ``with_proj``: also ``V' M^-1 v``.

        The eigenbasis genes' ``V' M^-1 v`` is free (``V' V = I``); the others' takes a GEMM.
        """
        idx = self.eigen_idx
        out = apply_blocks(self.parts["spot"], v)
        if not with_proj:
            if idx.numel():
                out = out.index_copy(0, idx, self._eigen(v[idx], None if proj is None else proj[idx])[0])
            return out
        b, _, q, k = v.shape
        out_proj = v.new_empty((b, self.vec.shape[1], q, k))
        if self.spot_idx.numel():
            out_proj[self.spot_idx] = _project(self.vec, out[self.spot_idx])
        if idx.numel():
            out[idx], out_proj[idx] = self._eigen(v[idx], proj[idx])
        return out, out_proj


class PrecisionOperators:
    """``v -> (W + C^-1) v`` and a preconditioner (:class:`RandomEffectPreconditioner`) on ``(B, n q, k)``.

    ``blocks`` are the per-spot ``W_i`` ``(B, n, q, q)``; ``a``, ``e`` the
    factors of :func:`prior_precision`.  :meth:`restrict` is :func:`pcg`'s
    ``restrict``.  With ``carry`` (and an eigenbasis) vectors carry ``V' v``
    as ``r q`` more rows, as in :class:`TWOperators`: three GEMMs with ``V``
    per PCG iteration instead of four.
    """

    def __init__(self, blocks, vec, a, e, carry: bool = False, *,
                 _pre: RandomEffectPreconditioner | None = None) -> None:
        self.blocks, self.vec, self.a, self.e = blocks, vec, a, e
        self.carry = carry and a is not None
        self.pre = _pre if _pre is not None else RandomEffectPreconditioner(blocks, vec, a, e)

    def _split(self, v):
        b, n, q, _ = self.blocks.shape
        k = v.shape[-1]
        vh = v[:, n * q:].reshape(b, -1, q, k) if self.carry else None
        return v[:, : n * q].reshape(b, n, q, k), vh

    def matvec(self, v):
        import torch

        b, _, k = v.shape
        v4, vh = self._split(v)
        w4 = apply_blocks(self.blocks, v4)
        if not self.carry:
            return (w4 + apply_precision(v4, self.vec, self.a, self.e)).reshape(v.shape)
        a_t, e_t = self.a.transpose(1, 2)[..., None], self.e[:, None, :, None]
        out = w4 + e_t * v4 + _back(self.vec, a_t * vh)
        out_h = _project(self.vec, w4) + (a_t + e_t) * vh
        return torch.cat([out.reshape(b, -1, k), out_h.reshape(b, -1, k)], 1)

    def precond(self, v):
        import torch

        b, _, k = v.shape
        v4, vh = self._split(v)
        if not self.carry:
            return self.pre(v4).reshape(v.shape)
        out, out_h = self.pre(v4, vh, with_proj=True)
        return torch.cat([out.reshape(b, -1, k), out_h.reshape(b, -1, k)], 1)

    def restrict(self, genes) -> tuple[Callable, Callable]:
        sub = PrecisionOperators(self.blocks[genes], self.vec, _take(self.a, genes), self.e[genes], self.carry,
                                 _pre=self.pre.subset(genes))
        return sub.matvec, sub.precond


def _x1_times(x1, w, q: int):
    """``(X1 (x) I_q) w``: ``(n, F1)``, ``(B, F1 q, k)`` -> ``(B, n, q, k)``."""
    import torch

    b, _, k = w.shape
    return torch.einsum("nf,bfqk->bnqk", x1, w.reshape(b, x1.shape[1], q, k))


def _x1_transpose(x1, v):
    """``(X1 (x) I_q)' v``: ``(n, F1)``, ``(B, n, q, k)`` -> ``(B, F1 q, k)``."""
    import torch

    b, _, q, k = v.shape
    return torch.einsum("nf,bnqk->bfqk", x1, v).reshape(b, x1.shape[1] * q, k)


class TWOperators:
    """``H' v`` and a preconditioner in the coordinates ``(t, w)``, ``t = nu + X1 w``, on ``(B, N, k)`` tensors.

    The likelihood depends on ``t`` only and the prior on ``nu = t - X1 w``, so::

        H' = [[W + C^-1, -C^-1 X1], [-X1' C^-1, X1' C^-1 X1 + ridge I]]

    needs one ``C^-1`` product per column (of ``t - X1 w``), and the
    near-confounding of the intercepts with the mean of ``nu`` costs no
    cancellation (unlike ``(nu, w)``, where ``W`` enters both blocks).  Newton
    steps are the same in either coordinates.  The preconditioner inverts
    ``H'`` exactly after replacing ``W + C^-1`` by ``M``
    (:class:`RandomEffectPreconditioner`): ``M^-1`` and the Schur complement
    ``X1' C^-1 X1 - X1' C^-1 M^-1 C^-1 X1`` (about ``X1' (W^-1 + C)^-1 X1``,
    formed in float64; eigenvalues floored, which keeps it positive definite).

    With ``carry`` (and an eigenbasis), vectors carry ``V' t`` as ``r q``
    more rows (:func:`carried_rows`; :func:`pcg` with ``rows``): PCG's linear
    updates keep it, so a product with ``H'`` costs two GEMMs with ``V`` and
    an eigenbasis preconditioner one, instead of two each.  Everything is kept
    per gene: :meth:`restrict` (:func:`pcg`'s) only indexes.
    """

    _PER_GENE = ("blocks", "a", "e", "cx", "cx_proj", "pre_cx", "pre_cx_proj", "schur_inv", "ridge_m")

    def __init__(self, system: dict, vec, n: int, ridge: float = 0.0, carry: bool = False, *,
                 _state: tuple | None = None) -> None:
        if _state is not None:
            self.g, self.pre, self.shared = _state
            return
        import torch

        blocks, a, e, x1 = system["blocks"], system["a"], system["e"], system["x1"]
        b, _, q, _ = blocks.shape
        m = x1.shape[1] * q
        eye_m = torch.eye(m, dtype=blocks.dtype, device=blocks.device)
        x_cols = _x1_times(x1, eye_m.expand(b, m, m), q)  # (B, n, q, m)
        cx = e[:, None, :, None] * x_cols  # C^-1 X1, and V' C^-1 X1 (B, r, q, m) for the preconditioner
        cx_proj = vx = None
        if a is not None:  # V' X1 is the same for every gene: one GEMM for C^-1 X1, none for V' C^-1 X1
            r = vec.shape[1]
            eye_q = torch.eye(q, dtype=blocks.dtype, device=blocks.device)
            vx = torch.einsum("rf,ij->rifj", vec.T @ x1, eye_q).reshape(r, q, m)  # V' X1 per logit, columns f q + j
            ax = a.transpose(1, 2)[..., None] * vx  # (B, r, q, m)
            cx = cx + _back(vec, ax)
            cx_proj = ax + e[:, None, :, None] * vx
        d_w = _x1_transpose(x1, cx)
        scale = d_w.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=torch.finfo(d_w.dtype).tiny)
        ridge_m = ridge * scale[:, None, None] * eye_m
        d_w = 0.5 * (d_w + d_w.transpose(1, 2)) + ridge_m
        pre = RandomEffectPreconditioner(blocks, vec, a, e)
        carry = carry and a is not None
        pre_cx, pre_cx_proj = pre(cx, cx_proj, with_proj=True) if carry else (pre(cx, cx_proj), None)
        schur = d_w.double() - torch.einsum("bnqi,bnqj->bij", cx.double(), pre_cx.double())
        lam, u = torch.linalg.eigh(0.5 * (schur + schur.transpose(1, 2)))
        lam = lam.clamp(min=1e-8 * lam.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(lam.dtype).tiny))
        schur_inv = torch.einsum("bij,bj,bkj->bik", u, 1.0 / lam, u).to(blocks.dtype)
        self.g = {"blocks": blocks, "a": a, "e": e, "cx": cx, "cx_proj": cx_proj, "pre_cx": pre_cx,
                  "pre_cx_proj": pre_cx_proj, "schur_inv": schur_inv, "ridge_m": ridge_m}
        self.pre = pre
        self.shared = {"vec": vec, "x1": x1, "vx": vx, "n": n, "q": q, "m": m, "carry": carry}

    @property
    def carry(self) -> bool:
        return self.shared["carry"]

    def restrict(self, genes) -> tuple[Callable, Callable]:
        """``(matvec, precond)`` of the genes ``genes`` alone (:func:`pcg`'s ``restrict``)."""
        sub = TWOperators({}, None, 0, _state=({k: _take(v, genes) for k, v in self.g.items()},
                                                self.pre.subset(genes), self.shared))
        return sub.matvec, sub.precond

    def _split(self, v):
        s = self.shared
        b, _, k = v.shape
        n, q, m = s["n"], s["q"], s["m"]
        nq = n * q
        vh = v[:, nq + m:].reshape(b, -1, q, k) if s["carry"] else None
        return v[:, :nq].reshape(b, n, q, k), v[:, nq: nq + m], vh

    def matvec(self, v):
        import torch

        g, s = self.g, self.shared
        vec, x1, q = s["vec"], s["x1"], s["q"]
        b, _, k = v.shape
        vt, vw, vh = self._split(v)
        if not s["carry"]:
            p = apply_precision(vt - _x1_times(x1, vw, q), vec, g["a"], g["e"])
        else:
            a_t, e_t = g["a"].transpose(1, 2)[..., None], g["e"][:, None, :, None]
            uh = vh - torch.einsum("rqm,bmk->brqk", s["vx"], vw)  # V' (t - X1 w)
            p = e_t * (vt - _x1_times(x1, vw, q)) + _back(vec, a_t * uh)
        wt = apply_blocks(g["blocks"], vt)
        out = [(wt + p).reshape(b, -1, k), -_x1_transpose(x1, p) + g["ridge_m"] @ vw]
        if s["carry"]:  # V' p = (a + e) V' (t - X1 w)
            out.append((_project(vec, wt) + (a_t + e_t) * uh).reshape(b, -1, k))
        return torch.cat(out, dim=1)

    def precond(self, v):
        import torch

        g, s = self.g, self.shared
        b, _, k = v.shape
        vt, vw, vh = self._split(v)
        pt, ph = self.pre(vt, vh, with_proj=True) if s["carry"] else (self.pre(vt), None)
        xw = g["schur_inv"] @ (vw + torch.einsum("bnqm,bnqk->bmk", g["cx"], pt))
        xt = pt + torch.einsum("bnqm,bmk->bnqk", g["pre_cx"], xw)
        out = [xt.reshape(b, -1, k), xw]
        if s["carry"]:
            out.append((ph + torch.einsum("brqm,bmk->brqk", g["pre_cx_proj"], xw)).reshape(b, -1, k))
        return torch.cat(out, dim=1)


def carried_rows(vec, t):
    """``V' t`` as the extra rows of :class:`TWOperators` with ``carry``: ``(B, n, q, k)`` -> ``(B, r q, k)``."""
    b, _, q, k = t.shape
    return _project(vec, t).reshape(b, -1, k)


def joint_hessian_vector(params: dict, data: dict, cfg, learn: list[str], direction: dict) -> dict:
    """Product of the negative log joint's Hessian with ``direction``, from the Newton system's pieces.

    ``direction`` holds ``nu``, ``bias``, ``beta`` and the variance
    parameters of ``learn`` (``theta_logit``, ``sigma``); so does the result.
    This is the matrix the Newton step inverts (in the coordinates of
    :class:`TWOperators`, mapped back); the tests compare it with autograd.
    """
    import torch

    system = _newton_system(params, data, cfg, learn)
    b, n, q = params["nu"].shape
    x1 = system["x1"]
    matvec = TWOperators(system, data.get("eigvecs"), n).matvec
    dw = torch.cat([direction["bias"], direction["beta"].reshape(b, -1)], 1)[..., None]
    dt = direction["nu"][..., None] + _x1_times(x1, dw, q)  # (t, w) = T (nu, w)
    h = matvec(torch.cat([dt.reshape(b, n * q, 1), dw], 1))
    ht, hw = h[:, : n * q].reshape(b, n, q, 1), h[:, n * q:]
    hw = hw + _x1_transpose(x1, ht)  # T' (ht, hw)
    out = {"nu": ht[..., 0], "bias": hw[:, :q, 0], "beta": hw[:, q:, 0].reshape(b, -1, q)}
    if system["phi"]:
        dphi = torch.cat([direction[k] for k in system["phi"]], dim=1)
        cols = system["cols_phi"]
        out["nu"] = out["nu"] + torch.einsum("bnqm,bm->bnq", cols, dphi)
        h_phi = torch.einsum("bnqm,bnq->bm", cols, direction["nu"]) + torch.einsum("bmk,bk->bm", system["d_phi"], dphi)
        start = 0
        for k in system["phi"]:
            out[k] = h_phi[:, start: start + params[k].shape[1]]
            start += params[k].shape[1]
    return out


def _held_at_bound(params: dict, phi: list[str], g_phi):
    """``(B, m)``: variance coordinates held this step (``theta_logit`` at its bound, pushed outwards)."""
    import torch

    held = torch.zeros_like(g_phi, dtype=torch.bool)
    start = 0
    for k in phi:
        width = params[k].shape[1]
        if k == "theta_logit":
            t, g = params[k], g_phi[:, start: start + width]
            held[:, start: start + width] = ((t >= THETA_LOGIT_BOUND) & (g < 0)) | ((t <= -THETA_LOGIT_BOUND) & (g > 0))
        start += width
    return held


def newton_direction(params: dict, data: dict, cfg, learn: list[str], *, cg_tol=None):
    """The (modified) Newton direction of the negative log joint, for every gene of a batch.

    One PCG solve with ``H_uu`` (in the coordinates of :class:`TWOperators`) for the gradient and
    the variance parameters' columns, then the small Schur system of the
    variance parameters (eigenvalues replaced by their absolute values).

    Parameters
    ----------
    params, data, cfg, learn
        As :func:`spatialscale.glmm.objective.loss_and_gradients`.
    cg_tol
        Relative PCG residual; default: per gene ``min(0.1, |g|)`` (an
        inexact Newton method that tightens as the gradient vanishes), at
        least :data:`CG_TOL` of the dtype.

    Returns
    -------
    direction, slope, loss, cg_iterations
        ``direction`` has an entry per name of ``learn``; ``slope`` ``(B,)``
        is the directional derivative ``g' d`` (negative for a descent
        direction), ``loss`` ``(B,)`` the loss at ``params`` and
        ``cg_iterations`` ``(B,)`` the most iterations any column needed.
    """
    import torch

    system = _newton_system(params, data, cfg, learn)
    b, n, q = params["nu"].shape
    nq = n * q
    x1 = system["x1"]
    with torch.no_grad():
        g_nu, g_phi, cols = system["g_nu"], system["g_phi"], system["cols_phi"]
        # gradient in (t, w): d/dt = d/dnu, d/dw at fixed t = -X1' C^-1 nu (no cancellation)
        g_tw = torch.cat([g_nu.reshape(b, nq), -_x1_transpose(x1, system["prior_grad"][..., None])[..., 0]], 1)
        if cg_tol is None:
            floor = CG_TOL["float64" if g_nu.dtype == torch.float64 else "float32"]
            gnorm = g_tw.norm(dim=1) if g_phi is None else torch.cat([g_tw, g_phi], 1).norm(dim=1)
            cg_tol = gnorm.clamp(min=floor, max=0.1)
        vec = data.get("eigvecs")
        ops = TWOperators(system, vec, n, ridge=_RIDGE, carry=True)  # carries V' t where there is an eigenbasis

        # the variance parameters' columns in (t, w): [d(C^-1 nu)/d phi; -X1' d(C^-1 nu)/d phi]
        cols_tw = torch.cat([cols.reshape(b, nq, -1), -_x1_transpose(x1, cols)], 1)
        rhs = torch.cat([g_tw[..., None], cols_tw], dim=-1)
        rows = rhs.shape[1]
        if ops.carry:
            rhs = torch.cat([rhs, carried_rows(vec, torch.cat([g_nu[..., None], cols], -1))], 1)
        sol, iters = pcg(ops.matvec, rhs, ops.precond, tol=cg_tol, restrict=ops.restrict, rows=rows)
        sol = sol[:, :rows]
        d_tw = -sol[..., 0]
        dphi = None
        if g_phi is not None:
            z0, zc = sol[..., 0], sol[..., 1:]
            schur = system["d_phi"] - torch.einsum("bni,bnj->bij", cols_tw, zc)
            schur = 0.5 * (schur + schur.transpose(1, 2))
            rhs_phi = -g_phi + torch.einsum("bnm,bn->bm", cols_tw, z0)
            held = _held_at_bound(params, system["phi"], g_phi)
            keep_phi = (~held).to(schur.dtype)  # a held coordinate: identity row, zero right-hand side
            schur = schur * keep_phi[:, :, None] * keep_phi[:, None, :] + torch.diag_embed(held.to(schur.dtype))
            lam, vec = torch.linalg.eigh(schur)
            mag = lam.abs()
            keep = mag > _RCOND * mag.amax(-1, keepdim=True).clamp(min=torch.finfo(lam.dtype).tiny)
            inv = torch.where(keep, 1.0 / torch.where(keep, mag, torch.ones_like(mag)), torch.zeros_like(mag))
            dphi = torch.einsum("bij,bj,bkj,bk->bi", vec, inv, vec, rhs_phi * keep_phi)
            d_tw = d_tw - torch.einsum("bnm,bm->bn", zc, dphi)
        dw = d_tw[:, nq:]
        d_nu = d_tw[:, :nq].reshape(b, n, q) - _x1_times(x1, dw[..., None], q)[..., 0]  # nu = t - X1 w
        direction = {"nu": d_nu, "bias": dw[:, :q], "beta": dw[:, q:].reshape(b, -1, q)}
        slope = (g_nu * d_nu).sum((1, 2)) + (system["g_w"] * dw).sum(1)
        if dphi is not None:
            slope = slope + (g_phi * dphi).sum(1)
            start = 0
            for k in system["phi"]:
                direction[k] = dphi[:, start: start + params[k].shape[1]]
                start += params[k].shape[1]
    return {k: v for k, v in direction.items() if k in learn}, slope, system["loss"], iters.amax(-1)


def _subset(data: dict, idx) -> dict:
    """The genes ``idx`` of a batch's data (shared entries are kept as they are)."""
    per_gene = ("counts", "totals", "lgamma_const")
    return {k: (v[idx] if k in per_gene else v) for k, v in data.items()}


def line_search(params: dict, direction: dict, slope, loss0, data: dict, cfg):
    """Per-gene backtracking: the largest ``alpha`` in ``1, 1/2, 1/4, ...`` with an Armijo decrease.

    Genes with no acceptable ``alpha`` keep their parameters.

    Returns
    -------
    params, loss, accepted
        New parameters, their losses ``(B,)`` and whether a step was taken.
    """
    import torch


    b = loss0.shape[0]
    dev = loss0.device
    new = {k: v.clone() for k, v in params.items()}
    new_loss = loss0.clone()
    accepted = torch.zeros(b, dtype=torch.bool, device=dev)
    searching = torch.isfinite(slope)
    alpha = 1.0
    descent = torch.clamp(slope, max=0.0)
    with torch.no_grad():
        # V' nu moves linearly with the step: two GEMMs here instead of one per trial
        moves = cfg.model == "glmm-full" and "nu" in direction
        proj0, proj_d = ((project(data["eigvecs"], params["nu"]), project(data["eigvecs"], direction["nu"]))
                         if moves else (None, None))
        for _ in range(_MAX_HALVINGS):
            idx = searching.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            trial = {k: (params[k][idx] + alpha * direction[k][idx]) if k in direction else params[k][idx]
                     for k in params}
            if "theta_logit" in direction:
                trial["theta_logit"] = trial["theta_logit"].clamp(-THETA_LOGIT_BOUND, THETA_LOGIT_BOUND)
            val = neg_log_joint(trial, _subset(data, idx), cfg,
                                proj=proj0[idx] + alpha * proj_d[idx] if moves else None)
            ok = torch.isfinite(val) & (val < loss0[idx]) & (val <= loss0[idx] + _ARMIJO * alpha * descent[idx])
            take = idx[ok]
            for k in direction:
                new[k][take] = trial[k][ok]
            new_loss[take] = val[ok].to(new_loss.dtype)
            accepted[take] = True
            searching[take] = False
            alpha *= 0.5
    return new, new_loss, accepted


def fit_joint_newton(counts: np.ndarray, eigvals: np.ndarray | None, eigvecs: np.ndarray | None, *,
                     design: np.ndarray | None = None, config=None, device: str = "cpu",
                     init: dict | None = None) -> dict[str, np.ndarray]:
    """Fit the GLMM of every gene in a batch by Newton steps on the joint likelihood.

    Works with fixed or learnt ``sigma``, shared or per-logit variances,
    ``glmm-full`` (full or low-rank eigenpairs) and ``glmm-null``, with or
    without covariates.  Each epoch is one Newton step per active gene (a
    batched PCG solve, the small Schur system, a backtracking line search);
    a gene stops after ``patience`` epochs without an improvement of at least
    ``tol`` and then no longer changes, and the computations of a gene never
    involve its batch-mates.

    Parameters
    ----------
    counts, eigvals, eigvecs, design, config, device, init
        As :func:`spatialscale.glmm.glmm.fit_glmm`.

    Returns
    -------
    dict
        As :func:`spatialscale.glmm.glmm.fit_glmm` (``loss`` is the negative
        log joint at the returned, best, parameters).
    """
    import torch

    cfg = config or GLMMConfig(method="joint_newton")
    data, params, learn = setup_fit(counts, eigvals, eigvecs, design, cfg, device, init)
    b = params["nu"].shape[0]
    stop = PerGeneStopping(b, cfg, params["nu"].device)
    with torch.no_grad():
        stop.record(torch.arange(b, device=params["nu"].device), neg_log_joint(params, data, cfg), first=True)
    for _ in range(cfg.max_epochs):
        idx = stop.running()
        if idx.numel() == 0:
            break
        sub = {k: v[idx] for k, v in params.items()}
        sub_data = _subset(data, idx)
        direction, slope, loss0, _ = newton_direction(sub, sub_data, cfg, learn)
        new, new_loss, _ = line_search(sub, direction, slope, loss0, sub_data, cfg)
        with torch.no_grad():
            for k in direction:
                params[k][idx] = new[k]
            stop.record(idx, new_loss)
    # every accepted step lowers the loss, so the current parameters are the best ones
    return pack_fit(params, stop.best_loss, stop.epochs, stop.converged, data)
