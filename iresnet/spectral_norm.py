"""Soft spectral normalisation (Eq. 2) and exact / certified operator norms of convolutions.

The residual branch ``g`` of an i-ResNet block must satisfy ``Lip(g) < 1`` (Theorem 1). Each linear map ``W`` in
``g`` is scaled only down (Eq. 2)::

    W_eff = W / max(1, sigma / c)

where ``sigma`` is a power-iteration estimate of ``||W||_2``. For a convolution that estimate is taken on the
convolution *operator* at the layer's real input shape (conv2d and its adjoint conv_transpose2d applied to probe
tensors; Gouk et al. 2018), not on the reshaped kernel matrix (Miyato et al. 2018), whose norm is a different number.

Power iteration only ever under-estimates ``||W||_2``, so after training the norms are checked exactly:

* ``conv_singular_values``: every singular value of the circular convolution (2-D FFT + per-frequency SVD;
  Sedghi, Gupta, Long 2019);
* ``conv_norm_upper_bound``: a certified upper bound for the zero-padded convolution (the smallest circular norm
  over the grids that contain it);
* ``conv_norm_lower_bound``: power iteration on the exact zero-padded operator, run to convergence;
* ``conv_norm_exact``: the true norm of the zero-padded operator (dense when small, else Lanczos to a tolerance),
  with how it was obtained;
* ``dense_operator`` / ``operator_norm``: the dense matrix of any small linear map and its exact norm (tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DENSE_LIMIT",
    "DENSE_MARGIN",
    "EXACT_DENSE_LIMIT",
    "EXACT_RTOL",
    "ExactNorm",
    "LipschitzConv2d",
    "LipschitzLinear",
    "conv_norm_exact",
    "conv_norm_lower_bound",
    "conv_norm_upper_bound",
    "conv_singular_values",
    "dense_conv_norm",
    "dense_operator",
    "frozen_weights",
    "layer_lipschitz_bound",
    "operator_norm",
    "project_to_bound",
]

_EPS = 1e-12  # guards the normalisation of an all-zero probe (a zero weight)


def _unit(t: Tensor) -> Tensor:
    """``t`` divided by its Euclidean norm over all entries."""
    return t / t.norm().clamp_min(_EPS)


class _SpectrallyNormalised(nn.Module):
    """Shared machinery: the buffers ``u``, ``v``, ``sigma`` and Eq. 2, for any linear operator ``_op``.

    Subclasses define ``weight`` and the operator pair ``_op(v, weight)`` (``W v``) and ``_adjoint(u, weight)``
    (``W^T u``), then call ``_init_vectors`` with the shape of the input probe.
    """

    weight: nn.Parameter
    u: Tensor  # buffers, registered by _init_vectors
    v: Tensor
    sigma: Tensor

    def __init__(self, coeff: float | None, n_power_iter: int) -> None:
        super().__init__()
        if coeff is not None and not coeff > 0:
            raise ValueError(f"coeff must be > 0 (or None for an unconstrained layer), got {coeff}")
        if n_power_iter < 0:
            raise ValueError(f"n_power_iter must be >= 0, got {n_power_iter}")
        self.coeff = None if coeff is None else float(coeff)
        self.n_power_iter = int(n_power_iter)
        self._frozen_weight: Tensor | None = None  # set by frozen_weights(): reused by every forward inside it

    def _op(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_vectors(self, v_shape: tuple[int, ...]) -> None:
        # v from the global RNG (reproducible under a seed); u = W v / |W v| makes sigma = |W v| > 0 a valid
        # under-estimate from the start, so a layer with n_power_iter = 0 is still sensible.
        with torch.no_grad():
            v = _unit(torch.randn(v_shape, dtype=self.weight.dtype))
            wv = self._op(v, self.weight)
            u = _unit(wv)
            sigma = (u * wv).sum()
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self.register_buffer("sigma", sigma)

    @torch.no_grad()
    def power_iterate(self, n_iter: int) -> Tensor:
        """Run ``n_iter`` power iterations on ``W^T W``, store ``u``, ``v`` and ``sigma = <u, W v>``; return sigma."""
        u, v = self.u, self.v
        if n_iter == 0:
            wv = self._op(v, self.weight)
        for _ in range(n_iter):
            v = _unit(self._adjoint(u, self.weight))
            wv = self._op(v, self.weight)  # the last one also gives sigma: no extra application of W
            u = _unit(wv)
        self.u.copy_(u)
        self.v.copy_(v)
        self.sigma.copy_((u * wv).sum())
        return self.sigma.clone()

    def _sigma(self) -> Tensor:
        """``<u, W v>`` with the stored vectors, differentiable in ``W`` (Miyato et al. 2018).

        The clones keep the autograd graph independent of later in-place updates of the buffers.
        """
        return (self.u.clone() * self._op(self.v.clone(), self.weight)).sum()

    def effective_weight(self) -> Tensor:
        """Eq. 2: ``W / max(1, sigma / c)`` from the stored ``u``, ``v``; the raw weight when ``coeff`` is None.

        This is the weight the forward pass uses in eval mode (and in training mode after its power iterations).
        """
        if self.coeff is None:
            return self.weight
        return self.weight / torch.clamp(self._sigma() / self.coeff, min=1.0)

    def _forward_weight(self) -> Tensor:
        if self._frozen_weight is not None:
            return self._frozen_weight
        if torch.is_autocast_enabled(self.weight.device.type):
            # Under mixed precision the normalisation stays in float32: a bf16 sigma would under-estimate the norm
            # by up to ~0.4% and let the constraint (and its certificate) slip. The convolution itself may run in bf16.
            with torch.autocast(device_type=self.weight.device.type, enabled=False):
                return self._normalised_weight()
        return self._normalised_weight()

    def _normalised_weight(self) -> Tensor:
        if self.coeff is not None and self.training:
            self.power_iterate(self.n_power_iter)
        return self.effective_weight()


@contextmanager
def frozen_weights(module: nn.Module) -> Iterator[None]:
    """Inside the ``with``: every spectrally normalised layer of ``module`` uses one fixed Eq. 2 weight.

    The weights are computed once on entry from the stored ``u``, ``v`` (as in eval mode: no power iteration), so
    repeated evaluations of ``g`` (the fixed-point inverse) neither pay for the normalisation each time nor change
    the buffers ``u``, ``v``, ``sigma``, even in training mode. The weights carry the gradient mode of the entry.
    """
    layers = [m for m in module.modules() if isinstance(m, _SpectrallyNormalised)]
    for layer in layers:
        layer._frozen_weight = layer.effective_weight()
    try:
        yield
    finally:
        for layer in layers:
            layer._frozen_weight = None


class LipschitzConv2d(_SpectrallyNormalised):
    """Stride-1, zero-padded ("same") conv2d whose operator norm is softly bounded by ``coeff`` (Eq. 2).

    Shapes: input ``(B, in_channels, H, W)`` with ``(H, W) == input_hw``, output ``(B, out_channels, H, W)``.
    ``sigma`` comes from power iteration on the convolution operator acting on ``(1, in_channels, H, W)`` probes
    (Gouk et al. 2018): buffers ``u`` ``(1, out_channels, H, W)``, ``v`` ``(1, in_channels, H, W)`` and the scalar
    ``sigma`` live in the state dict. Training mode runs ``n_power_iter`` iterations per forward; eval mode reuses
    the stored vectors and changes nothing. ``coeff=None`` gives the unconstrained (vanilla) convolution.

    >>> import torch
    >>> conv = LipschitzConv2d(2, 2, 3, input_hw=(6, 6), coeff=0.5, n_power_iter=20)
    >>> conv(torch.randn(4, 2, 6, 6)).shape
    torch.Size([4, 2, 6, 6])
    >>> exact = conv_norm_exact(conv.eval().effective_weight().detach(), (6, 6), conv.padding).value
    >>> exact <= layer_lipschitz_bound(conv) < 0.5 * 1.01  # the exact norm, under the certificate, at about c
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_hw: tuple[int, int],
        coeff: float | None,
        n_power_iter: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(coeff, n_power_iter)
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(
                f"kernel_size must be odd and positive so that 'same' zero padding exists, got {kernel_size}"
            )
        hw = tuple(int(s) for s in input_hw)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"input_hw must be the (H, W) the layer sees, two positive ints; got {hw}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channel counts must be positive, got in={in_channels}, out={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.input_hw: tuple[int, int] = (hw[0], hw[1])
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # The same initialisation as torch.nn.Conv2d, so the vanilla baseline is an ordinary conv net.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_vectors((1, in_channels, *hw))

    def _op(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, padding=self.padding)

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        # With stride 1 the transposed convolution with the same padding is the exact adjoint and maps back to H x W.
        return F.conv_transpose2d(u, weight, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H, W)`` with the Eq. 2 weight."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {self.input_hw[0]}, {self.input_hw[1]}), "
                f"got {tuple(x.shape)}; "
                "the power iteration runs at input_hw, so build the layer with the spatial size it really sees "
                "(after any squeeze)"
            )
        return F.conv2d(x, self._forward_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, input_hw={self.input_hw}, "
            f"coeff={self.coeff}, n_power_iter={self.n_power_iter}, bias={self.bias is not None}"
        )


class LipschitzLinear(_SpectrallyNormalised):
    """Dense layer ``(B, in_features) -> (B, out_features)`` with the Eq. 2 weight; power iteration on the matrix.

    Buffers ``u`` ``(out_features,)``, ``v`` ``(in_features,)`` and ``sigma``; same train/eval behaviour as
    ``LipschitzConv2d``. Used by the 2-D toy MLP flows.
    """

    def __init__(
        self, in_features: int, out_features: int, coeff: float | None, n_power_iter: int = 1, bias: bool = True
    ) -> None:
        super().__init__(coeff, n_power_iter)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"feature counts must be positive, got in={in_features}, out={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as torch.nn.Linear
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_vectors((in_features,))

    def _op(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight @ v

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return weight.t() @ u

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_features) -> (B, out_features)`` with the Eq. 2 weight."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input (B, {self.in_features}), got {tuple(x.shape)}")
        return F.linear(x, self._forward_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, coeff={self.coeff}, n_power_iter={self.n_power_iter}, "
            f"bias={self.bias is not None}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Exact and certified norms (verification after training; float64 throughout)


def conv_singular_values(weight: Tensor, input_hw: tuple[int, int]) -> Tensor:
    """All singular values of the circular convolution of ``weight`` on an ``H x W`` input, sorted descending.

    ``weight``: ``(C_out, C_in, kh, kw)``. Returns a float64 tensor of length ``H * W * min(C_out, C_in)``.
    The operator is PyTorch's centred cross-correlation with periodic wrap,
    ``y[o, i, j] = sum_{c,a,b} K[o, c, a, b] x[c, (i + a - kh//2) mod H, (j + b - kw//2) mod W]``. It is
    block-circulant, so the 2-D DFT turns it into the per-frequency ``C_out x C_in`` matrices
    ``A(f) = sum_{a,b} K[:, :, a, b] exp(2 pi i (f1 (a - kh//2) / H + f2 (b - kw//2) / W))``
    whose singular values, over all ``H * W`` frequencies, are the operator's (Sedghi, Gupta, Long 2019, Thm 6).
    """
    if weight.ndim != 4:
        raise ValueError(f"weight must be (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    h, w = (int(s) for s in input_hw)
    if h < 1 or w < 1:
        raise ValueError(f"input_hw must be two positive ints, got {input_hw}")
    c_out, c_in, kh, kw = weight.shape
    kernel = weight.detach().to(torch.float64)
    # Put tap (a, b) at offset ((a - kh//2) mod H, (b - kw//2) mod W); taps that alias (kernel larger than the
    # input) add up, exactly as the wrapped operator sums them.
    dev = kernel.device
    o = torch.arange(c_out, device=dev).view(-1, 1, 1, 1)
    c = torch.arange(c_in, device=dev).view(1, -1, 1, 1)
    rows = ((torch.arange(kh, device=dev) - kh // 2) % h).view(1, 1, -1, 1)
    cols = ((torch.arange(kw, device=dev) - kw // 2) % w).view(1, 1, 1, -1)
    wrapped = kernel.new_zeros(c_out, c_in, h, w)
    wrapped.index_put_((o, c, rows, cols), kernel, accumulate=True)
    # sum_m K[m] exp(+2 pi i f m / n) is the unnormalised inverse DFT: ifft2 with norm="forward".
    per_frequency = torch.fft.ifft2(wrapped, norm="forward").permute(2, 3, 0, 1)  # (H, W, C_out, C_in)
    values = torch.linalg.svdvals(per_frequency).flatten()
    return torch.sort(values, descending=True).values


def dense_operator(
    fn: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    chunk: int = 512,
) -> Tensor:
    """The dense matrix ``(out_numel, prod(input_shape))`` of the linear map ``fn`` at ``input_shape``.

    ``input_shape`` includes the batch dimension (e.g. ``(1, C, H, W)``). ``fn`` must act on each example along
    dim 0 independently (as every layer here does): basis vectors are stacked along that dimension, ``chunk`` at a
    time. Column ``j`` is ``fn(e_j)``. Meant for small inputs (tests, exact checks of zero-padded convolutions).
    """
    n = math.prod(input_shape)
    batch, rest = input_shape[0], tuple(input_shape[1:])
    columns = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            basis = torch.zeros(m, n, dtype=dtype, device=device)
            basis[torch.arange(m), torch.arange(start, start + m)] = 1.0
            out = fn(basis.reshape(m * batch, *rest))
            columns.append(out.reshape(m, -1))
    return torch.cat(columns).t()


def operator_norm(
    fn: Callable[[Tensor], Tensor],
    input_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> float:
    """Largest singular value of the linear map ``fn`` at ``input_shape`` (batch dim included), from its dense
    matrix."""
    return float(torch.linalg.matrix_norm(dense_operator(fn, input_shape, dtype, device), ord=2))


def _check_conv_geometry(weight: Tensor, input_hw: tuple[int, int], padding: int) -> tuple[int, int]:
    if weight.ndim != 4:
        raise ValueError(f"weight must be (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    h, w = (int(s) for s in input_hw)
    kh, kw = weight.shape[-2:]
    if h + 2 * padding < kh or w + 2 * padding < kw:
        raise ValueError(f"kernel {kh}x{kw} does not fit the padded input: input_hw={input_hw}, padding={padding}")
    return h, w


DENSE_LIMIT = 2048  # the exact norm from the dense operator when its smaller side has at most this many entries
# Relative margin on every certified norm (circular FFT bound, dense operator, linear layer): a float64 SVD or
# eigensolve rounds either way, by ~ n eps = 5e-13 at n = 2048 (measured: a 1x1 kernel's circular norm came out 2-9e-16
# below the true norm), so an unraised value is not strictly an upper bound.
DENSE_MARGIN = 1e-10


def dense_conv_norm(weight: Tensor, input_hw: tuple[int, int], padding: int) -> float:
    """The exact ``||conv2d(., weight, padding=padding)||_2`` on ``H x W`` inputs: the dense matrix ``A`` and the
    largest eigenvalue of the smaller Gram matrix (``AᵀA`` or ``AAᵀ``), float64. Cost ``O(min(m, n)² max(m, n))``."""
    kernel = weight.detach().to(torch.float64)
    dense = dense_operator(lambda z: F.conv2d(z, kernel, padding=padding), (1, kernel.shape[1], *input_hw))
    gram = dense.T @ dense if dense.shape[1] <= dense.shape[0] else dense @ dense.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


def conv_norm_upper_bound(
    weight: Tensor, input_hw: tuple[int, int], padding: int, dense_limit: int = DENSE_LIMIT
) -> float:
    """Certified upper bound on ``||conv2d(., weight, padding=padding)||_2`` for ``H x W`` inputs (stride 1).

    The zero-padded convolution equals (embed, circular convolution on an ``N_h x N_w`` grid, restrict) on every
    grid with ``N_h >= H + p`` and ``N_h >= H + 2p - kh + 1`` (the output height), and likewise in width, for the
    padding ``p``. Why, along the rows: embed the input at rows ``0..H-1`` of the grid, zeros elsewhere. Output row
    ``o`` reads the ``kh`` input rows from ``o - p``, all within ``[-p, H + p - 1]``. A row above the input (``< 0``)
    wraps to ``>= N_h - p >= H``, a zero row, as zero padding has it; a row below (``H .. H + p - 1 < N_h``) does not
    wrap and is zero too. The circular output at ``o - p + kh // 2`` (mod ``N_h``, its centred tap convention) is
    thus output ``o``, and the outputs land on distinct grid rows since there are at most ``N_h`` of them. Embedding
    and restriction have norm <= 1, so each such grid's largest circular singular value bounds the operator from
    above, and so does the smallest of them. It is taken over ``N_h`` from the least valid size to ``H + 2p`` (the
    plain padded embedding, the only grid used before), and likewise ``N_w``: grids sample different frequencies,
    and a small grid, sampling few, can miss the peak of the frequency response that a larger one catches. Power
    iteration, by contrast, only ever under-estimates a norm. For a 1x1 kernel (``p = 0``) the circular norm is
    exact. Every value is raised by :data:`DENSE_MARGIN` to cover the rounding of its float64 SVD.

    When the operator is small (its input or its output has at most ``dense_limit`` entries) the exact norm of the
    dense matrix (:func:`dense_conv_norm`), raised by the same margin, replaces the
    circular bound where lower: on small inputs the zero padding is a large share of the grid and the circular
    bound is loose (e.g. 10% on 7x7 inputs).
    """
    h, w = _check_conv_geometry(weight, input_hw, padding)
    c_out, c_in, kh, kw = weight.shape
    p = padding
    bound = (1.0 + DENSE_MARGIN) * min(
        float(conv_singular_values(weight, (n_h, n_w))[0])
        for n_h in range(max(h + p, h + 2 * p - kh + 1), h + 2 * p + 1)
        for n_w in range(max(w + p, w + 2 * p - kw + 1), w + 2 * p + 1)
    )
    out_numel = c_out * (h + 2 * p - kh + 1) * (w + 2 * p - kw + 1)
    circular_is_exact = kh == kw == 1 and p == 0
    if not circular_is_exact and min(c_in * h * w, out_numel) <= dense_limit:
        bound = min(bound, dense_conv_norm(weight, input_hw, padding) * (1.0 + DENSE_MARGIN))
    return bound


def conv_norm_lower_bound(
    weight: Tensor,
    input_hw: tuple[int, int],
    padding: int,
    n_iter: int = 500,
    block: int = 8,
    rtol: float = 1e-14,
) -> float:
    """Lower bound on ``||conv2d(., weight, padding=padding)||_2``, converging to it, for ``H x W`` inputs.

    Block power (subspace) iteration on ``A^T A`` for the exact zero-padded operator ``A``, in float64 from a
    fixed-seed start: ``block`` orthonormal probes ``V`` are pushed through ``A^T A`` and re-orthonormalised, and the
    estimate is ``||A V||_2``. For orthonormal ``V`` that is ``max |A V y|`` over unit ``y``, so every iterate is a
    valid lower bound. A block rather than one vector because convolution spectra come in near-degenerate pairs
    (frequencies ``f`` and ``-f``), on which single-vector power iteration stalls. Stops when the estimate changes
    by less than ``rtol`` (relative) or after ``n_iter`` iterations.
    """
    h, w = _check_conv_geometry(weight, input_hw, padding)
    kernel = weight.detach().to(torch.float64)
    c_in = kernel.shape[1]
    n = c_in * h * w
    block = max(1, min(block, n))
    generator = torch.Generator(device=kernel.device).manual_seed(0)
    start = torch.randn(n, block, generator=generator, dtype=torch.float64, device=kernel.device)
    basis = torch.linalg.qr(start).Q  # (n, block), orthonormal columns
    previous = estimate = 0.0
    for _ in range(n_iter):
        images = basis.t().reshape(block, c_in, h, w)  # the probes as a batch of inputs
        out = F.conv2d(images, kernel, padding=padding)
        estimate = float(torch.linalg.matrix_norm(out.reshape(block, -1), ord=2))
        if abs(estimate - previous) <= rtol * estimate:
            break
        previous = estimate
        back = F.conv_transpose2d(out, kernel, padding=padding).reshape(block, n).t()
        basis = torch.linalg.qr(back).Q
    return estimate


EXACT_DENSE_LIMIT = 256  # dense only below this (smaller side, entries): above it Lanczos is faster (see below)
EXACT_RTOL = 1e-10  # Lanczos stops when sigma is within this relative distance of a singular value


@dataclass(frozen=True)
class ExactNorm:
    """The true norm of a convolution operator and how it was obtained (:func:`conv_norm_exact`).

    ``method``: ``"dense"`` (eigvalsh of the dense operator's smaller Gram matrix, float64) or ``"lanczos"``.
    ``residual``: ``||AᵀA y − value² y|| / value²`` for the returned unit vector ``y`` (Lanczos; 0.0 for dense).
    ``steps``: Lanczos steps, i.e. applications of ``AᵀA`` in the Krylov basis (0 for dense).
    """

    value: float
    method: str
    residual: float
    steps: int


def _lanczos_top(matvec: Callable[[Tensor], Tensor], start: Tensor, rtol: float, max_steps: int) -> tuple[Tensor, int]:
    """Unit Ritz vector of the largest eigenvalue of the symmetric PSD map ``matvec`` (vectors ``(n,)``).

    Lanczos with full re-orthogonalisation (twice per step: the basis stays orthonormal in floating point, so no
    spurious copies of a converged eigenvalue appear; Parlett 1998, ch. 13). Every 10 steps the top Ritz pair
    ``(theta, y)`` of the tridiagonal matrix is checked by its explicit residual: stop when
    ``||M y − theta y|| <= rtol theta``. Returns ``(y, steps)``; raises if ``max_steps`` is reached unconverged.
    """
    n = start.numel()
    max_steps = min(max_steps, n)  # n steps span the whole space: the Ritz values are then the eigenvalues
    basis = start.new_empty(max_steps + 1, n)
    basis[0] = _unit(start)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(max_steps):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        for _ in range(2):  # projecting out every basis vector also does the three-term recurrence
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        betas.append(float(w.norm()))
        breakdown = betas[-1] <= 1e-14 * max(abs(a) for a in alphas)  # an invariant subspace: the Ritz values are exact
        if (j + 1) % 10 == 0 or breakdown or j + 1 == max_steps:
            tri = torch.diag(torch.tensor(alphas, dtype=w.dtype, device=w.device))
            off = torch.tensor(betas[:-1], dtype=w.dtype, device=w.device)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
            s = torch.linalg.eigh(tri).eigenvectors[:, -1]
            y = _unit(basis[: j + 1].T @ s)
            my = matvec(y)
            theta = float(y @ my)
            if float((my - theta * y).norm()) <= rtol * theta or theta == 0.0:
                return y, j + 1
        if j + 1 < max_steps:
            basis[j + 1] = w / betas[-1]
    raise RuntimeError(f"Lanczos did not reach a relative residual of {rtol:g} in {max_steps} steps")


def conv_norm_exact(
    weight: Tensor,
    input_hw: tuple[int, int],
    padding: int,
    dense_limit: int = EXACT_DENSE_LIMIT,
    rtol: float = EXACT_RTOL,
    max_steps: int = 2000,
) -> ExactNorm:
    """The true ``||conv2d(., weight, padding=padding)||_2`` on ``H x W`` inputs (stride 1, zero padding), float64.

    Small operators (input or output with at most ``dense_limit`` entries): :func:`dense_conv_norm`, exact up to
    rounding. Larger ones: Lanczos (:func:`_lanczos_top`) on ``M = AᵀA`` (``A`` applied as conv2d, ``Aᵀ`` as
    conv_transpose2d, so nothing of size ``n²`` is formed) from a fixed-seed start, stopped at the stated tolerance
    ``rtol``: the returned unit vector ``y`` has ``||M y − σ² y|| <= rtol σ²`` with ``σ = ||A y||``, so ``σ²`` lies
    within ``rtol σ²`` of an eigenvalue of ``M`` and ``σ`` within about ``rtol / 2`` of a singular value of ``A``
    (for a symmetric matrix a residual bounds the distance to the spectrum). ``σ = ||A y||`` is also a lower bound
    on the norm; that the singular value it meets is the largest is what Lanczos from a random start delivers (its
    Krylov space finds the extreme eigenvalues first) and what the tests check against dense SVDs. The certified
    bound stays :func:`conv_norm_upper_bound`. Why not dense throughout (measured on 2 shared threads): at the default
    classifiers' 3136-entry inputs the dense path takes 2-9 s per layer, 475 s for all 72 layers of the four default
    models, Lanczos 3.3 s for all 72 (10-150 steps each), agreeing with dense to 1e-13; at 1024 entries dense takes
    0.46 s and Lanczos 0.03 s, hence the low limit.
    """
    h, w = _check_conv_geometry(weight, input_hw, padding)
    kernel = weight.detach().to(torch.float64)
    c_out, c_in, kh, kw = kernel.shape
    n = c_in * h * w
    if min(n, c_out * (h + 2 * padding - kh + 1) * (w + 2 * padding - kw + 1)) <= dense_limit:
        return ExactNorm(dense_conv_norm(kernel, input_hw, padding), "dense", 0.0, 0)

    def gram(v: Tensor) -> Tensor:  # AᵀA v for a flat (n,) vector
        out = F.conv2d(v.view(1, c_in, h, w), kernel, padding=padding)
        return F.conv_transpose2d(out, kernel, padding=padding).flatten()

    generator = torch.Generator(device=kernel.device).manual_seed(0)
    start = torch.randn(n, generator=generator, dtype=torch.float64, device=kernel.device)
    y, steps = _lanczos_top(gram, start, rtol, max_steps)
    value = float(F.conv2d(y.view(1, c_in, h, w), kernel, padding=padding).norm())
    residual = float((gram(y) - value**2 * y).norm()) / value**2 if value > 0 else 0.0
    return ExactNorm(value, "lanczos", residual, steps)


def _weight_bound(layer: LipschitzConv2d | LipschitzLinear, weight: Tensor) -> float:
    weight = weight.detach()
    if isinstance(layer, LipschitzLinear):
        return float(torch.linalg.matrix_norm(weight.to(torch.float64), ord=2)) * (1.0 + DENSE_MARGIN)
    return conv_norm_upper_bound(weight, layer.input_hw, layer.padding)


def layer_lipschitz_bound(layer: LipschitzConv2d | LipschitzLinear) -> float:
    """Certified upper bound on the Lipschitz constant of ``layer`` as used in eval mode.

    Exact SVD norm for a linear layer; ``conv_norm_upper_bound`` at the layer's ``input_hw`` for a convolution.
    """
    if not isinstance(layer, (LipschitzConv2d, LipschitzLinear)):
        raise ValueError(f"expected a LipschitzConv2d or LipschitzLinear, got {type(layer).__name__}")
    return _weight_bound(layer, layer.effective_weight())


@torch.no_grad()
def project_to_bound(layer: LipschitzConv2d | LipschitzLinear, coeff: float, max_rounds: int = 4) -> float:
    """Scale ``layer.weight`` in place so that ``layer_lipschitz_bound(layer) <= coeff``; return the factor applied.

    Repairs a trained layer whose power iteration lagged (its ``sigma`` under-estimates the norm). Returns 1.0 and
    changes nothing if the bound already holds. Otherwise the raw weight is scaled by ``s = coeff / B(W)``, ``B``
    the certified bound of the raw weight, and that is enough whatever Eq. 2 did before: if it was active,
    ``B(W_eff) = c B(W) / sigma > coeff`` gives ``s sigma < c``; if not, ``sigma <= c`` and ``s < 1`` give the
    same. So after scaling Eq. 2 is inactive and ``B(W_eff) = s B(W) = coeff``. The stored ``sigma`` is scaled with
    the weight. Later power iterations can only raise ``sigma`` and so only shrink the effective weight further.
    """
    if not coeff > 0:
        raise ValueError(f"coeff must be > 0, got {coeff}")
    # A margin of a few ulps absorbs the rounding of the scaled weight; a retry covers any remainder.
    margin = 1.0 - 4.0 * torch.finfo(layer.weight.dtype).eps
    total = 1.0
    for _ in range(max_rounds):
        if layer_lipschitz_bound(layer) <= coeff:
            return total
        scale = coeff / _weight_bound(layer, layer.weight) * margin
        layer.weight.mul_(scale)
        layer.sigma.mul_(scale)
        total *= scale
    if layer_lipschitz_bound(layer) <= coeff:
        return total
    raise RuntimeError(f"could not bring the layer's bound below {coeff} in {max_rounds} rounds")
