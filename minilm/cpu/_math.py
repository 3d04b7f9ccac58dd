r"""Scalar exp, σ and tanh for the Numba kernels, in the argument's dtype, in plain arithmetic.

A scalar ``exp`` or ``tanh`` in a Numba loop is a call into libm, which no loop around it can
vectorise. These are written with one ``exp`` of a non-positive argument, computed by
``exp_nonpositive`` from instructions the compiler vectorises (float32 runs at float32 speed),
never overflowing:

.. math::
    \sigma(a) = \begin{cases} 1 / (1 + e^{-a}) & a \ge 0 \\ e^{a} / (1 + e^{a}) & a < 0 \end{cases},
    \qquad
    \tanh(a) = \operatorname{sign}(a)\,\frac{1 - e^{-2|a|}}{1 + e^{-2|a|}}
             = \operatorname{sign}(a)\,\frac{-m}{2 + m}, \quad m = e^{-2|a|} - 1 .

``exp_nonpositive`` is within about an ulp; σ is within a few ulps of 1, absolute. tanh takes
:math:`m = e^{x} - 1` from ``expm1_nonpositive`` (the same reduction, without adding back the 1)
rather than forming :math:`1 - e^{-2|a|}`, which for small :math:`|a|` cancels to a relative
error of about :math:`u / |a|` (1e-10 at a = 1e-6 in float64); so tanh is within a few ulps of
itself, relative, as NumPy's is.
Used by the recurrent cells, GELU and the attention softmax.

``sum_in_any_order`` adds up the start of a row in float64 with its additions in any order, so
that the compiler can vectorise them (see ``minilm.cpu._parallel.SUMS_IN_ANY_ORDER``); the flag
stays on its own instructions when it is inlined into a kernel that has no such flag.

The kernels start their float64 sums at ``np.float64(0.0)``, not ``0.0``. Compiled, the two are the
same; run as Python (``NUMBA_DISABLE_JIT=1``), NumPy 2 adds a float32 element to the Python float
0.0 in float32, and the sum would lose the precision the compiled kernel has.
"""
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from minilm.cpu._jit import jit
from minilm.reference import activations as reference

SCALAR_TYPES = {types.float32: np.float32, types.float64: np.float64}


# Each is a Python function (NumPy's, for use outside the kernels) with an ``@overload`` that
# Numba compiles in its place, per dtype, where a kernel calls it.

def exp_nonpositive(x):
    r"""e^x for x <= 0, in x's dtype, within about an ulp; 0 where e^x is below the smallest normal
    number. In a kernel: :math:`e^x = e^r\,2^n` with :math:`n = \operatorname{round}(x / \ln 2)`,
    :math:`r = x - n \ln 2` (ln 2 in two parts, so that n times the leading part is exact),
    :math:`|r| \le \ln 2 / 2`, :math:`e^r` by its Taylor series and :math:`2^n` built from its bits."""
    return np.exp(x)


def sigmoid(a):
    """σ(a) in a's dtype, with the one exp of ``exp_nonpositive`` (see the module docstring)."""
    return reference.sigmoid(np, np.asarray(a))


def expm1_nonpositive(x):
    r"""e^x - 1 for x <= 0, in x's dtype, within a few ulps relative (-1 where e^x is below the smallest
    normal number). In a kernel: with n and r as in ``exp_nonpositive``,
    :math:`e^x - 1 = 2^n (e^r - 1) + (2^n - 1)`, where :math:`e^r - 1` is the Taylor series without its
    leading 1, so nothing cancels near x = 0 (n = 0 there)."""
    return np.expm1(x)


def tanh(a):
    """tanh(a) in a's dtype, with the one exp of ``expm1_nonpositive`` (see the module docstring)."""
    return np.tanh(a)


@jit(error_model="numpy", fastmath={"reassoc"})
def sum_in_any_order(a, n):
    """sum(a[:n]) accumulated in float64, the additions in any order (rounding differs only)."""
    s = np.float64(0.0)
    for j in range(n):
        s += a[j]
    return s


@intrinsic
def _pow2(typingctx, k, like):
    """2^k as a float of like's type, for an integer k in the normal exponent range: the bits
    (k + bias) << mantissa reinterpreted as a float, plain instructions that vectorise."""
    if not isinstance(k, types.Integer) or like not in SCALAR_TYPES:
        return None

    def codegen(context, builder, signature, args):
        width, mantissa, bias = (32, 23, 127) if like == types.float32 else (64, 52, 1023)
        int_t = ir.IntType(width)
        k_int = builder.sext(args[0], int_t) if k.bitwidth < width else builder.trunc(args[0], int_t)
        bits = builder.shl(builder.add(k_int, ir.Constant(int_t, bias)), ir.Constant(int_t, mantissa))
        return builder.bitcast(bits, context.get_value_type(like))
    return like(k, like), codegen


LN_SMALLEST_NORMAL_32, LN_SMALLEST_NORMAL_64 = np.float32(-87.33654), -708.3964185322641   # below: e^x is 0
LN2_HI_64, LN2_LO_64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10   # ln 2 in two parts (fdlibm's)


def _exp_reduced_32(x):
    """(e^r - 1, 2^n) with e^x = 2^n e^r, for x <= 0 down to ln of the smallest normal float32."""
    xc = LN_SMALLEST_NORMAL_32 if x < LN_SMALLEST_NORMAL_32 else x   # a NaN stays NaN
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))  # n = round(x / ln 2), in [-126, 0]
    r = (xc - n * np.float32(0.693145751953125)) - n * np.float32(1.4286068e-06)  # r = x - n ln 2
    p = np.float32(1 / 5040)                                       # e^r - 1 by its Taylor series to r^7/7!,
    p = p * r + np.float32(1 / 720)                                # the remainder below 1e-8 relative
    p = p * r + np.float32(1 / 120)
    p = p * r + np.float32(1 / 24)
    p = p * r + np.float32(1 / 6)
    p = p * r + np.float32(1 / 2)
    p = p * r + np.float32(1)
    k = np.int32(n) if n == n else np.int32(0)                     # (never a NaN into an integer)
    return p * r, _pow2(k, xc)


def _exp_reduced_64(x):
    """(e^r - 1, 2^n) with e^x = 2^n e^r, for x <= 0 down to ln of the smallest normal float64."""
    xc = LN_SMALLEST_NORMAL_64 if x < LN_SMALLEST_NORMAL_64 else x   # a NaN stays NaN
    n = np.floor(xc * 1.4426950408889634 + 0.5)                    # n = round(x / ln 2), in [-1022, 0]
    r = (xc - n * LN2_HI_64) - n * LN2_LO_64                      # r = x - n ln 2, n LN2_HI_64 exact
    p = 1 / 6227020800                                             # e^r - 1 by its Taylor series to r^13/13!,
    p = p * r + 1 / 479001600                                      # the remainder below 1e-17 relative
    p = p * r + 1 / 39916800
    p = p * r + 1 / 3628800
    p = p * r + 1 / 362880
    p = p * r + 1 / 40320
    p = p * r + 1 / 5040
    p = p * r + 1 / 720
    p = p * r + 1 / 120
    p = p * r + 1 / 24
    p = p * r + 1 / 6
    p = p * r + 1 / 2
    p = p * r + 1.0
    k = np.int64(n) if n == n else np.int64(0)                     # (never a NaN into an integer)
    return p * r, _pow2(k, xc)


def _exp_reduced(x):
    """(e^r - 1, 2^n) of ``exp_nonpositive``'s reduction, e^x = 2^n e^r with n = round(x / ln 2),
    in x's dtype (NumPy's, outside the kernels; the kernels compile the overload below)."""
    x = np.asarray(x)
    n = np.floor(x.astype(np.float64) / np.log(2) + 0.5)
    r = (x - n * LN2_HI_64) - n * LN2_LO_64
    return np.expm1(r).astype(x.dtype), np.exp2(n).astype(x.dtype)


@overload(_exp_reduced)
def _exp_reduced_overload(x):
    return {types.float32: _exp_reduced_32, types.float64: _exp_reduced_64}.get(x)


@overload(exp_nonpositive)
def _exp_nonpositive(x):
    if x not in SCALAR_TYPES:
        return None
    lo = LN_SMALLEST_NORMAL_32 if x == types.float32 else LN_SMALLEST_NORMAL_64
    zero, one = SCALAR_TYPES[x](0), SCALAR_TYPES[x](1)

    def exp_scalar(x):
        q, s = _exp_reduced(x)
        return zero if x < lo else (q + one) * s                   # e^x = (1 + (e^r - 1)) 2^n
    return exp_scalar


@overload(expm1_nonpositive)
def _expm1_nonpositive(x):
    if x not in SCALAR_TYPES:
        return None
    lo, one = LN_SMALLEST_NORMAL_32 if x == types.float32 else LN_SMALLEST_NORMAL_64, SCALAR_TYPES[x](1)

    def expm1_scalar(x):
        q, s = _exp_reduced(x)
        return -one if x < lo else q * s + (s - one)               # e^x - 1 = 2^n (e^r - 1) + (2^n - 1)
    return expm1_scalar


@overload(sigmoid)
def _sigmoid(a):
    if a not in SCALAR_TYPES:
        return None
    one = SCALAR_TYPES[a](1)

    def sigmoid_scalar(a):
        e = exp_nonpositive(-abs(a))                               # e^{-|a|}
        s = one / (one + e)
        return s if a >= 0 else e * s
    return sigmoid_scalar


@overload(tanh)
def _tanh(a):
    if a not in SCALAR_TYPES:
        return None
    two = SCALAR_TYPES[a](2)

    def tanh_scalar(a):
        m = expm1_nonpositive(-two * abs(a))                       # e^{-2|a|} - 1, in [-1, 0]
        t = -m / (two + m)                                         # (1 - e^{-2|a|}) / (1 + e^{-2|a|})
        return math.copysign(t, a)                                 # tanh(±0) = ±0, as NumPy's
    return tanh_scalar
