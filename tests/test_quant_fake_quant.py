"""fake_quant: forward and STE backward against a NumPy oracle, grid membership, idempotence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.quantization import dequantize, fake_quant, qparams_from_range, quantize_int
from jaxcompress.quantization.fake_quant import quantize_int_numpy


def np_fake_quant(x, scale, zero_point, qmin, qmax):
  """Oracle: the contract formula in NumPy (np.round is half to even) and the STE mask."""
  q = np.round(x / scale) + zero_point
  out = (np.clip(q, qmin, qmax) - zero_point) * scale
  return out.astype(np.float32), ((q >= qmin) & (q <= qmax)).astype(np.float32)


def grid(bits, symmetric):
  return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def make_case(bits, symmetric, axis, seed=0):
  """Random x (some values clipped) and per-tensor or per-channel (scale, zero_point)."""
  rng = np.random.default_rng(seed)
  x = (3 * rng.standard_normal((3, 4, 5))).astype(np.float32)
  qmin, qmax = grid(bits, symmetric)
  shape = () if axis is None else tuple(n if i == axis % 3 else 1 for i, n in enumerate(x.shape))
  scale = rng.uniform(2.0, 6.0, shape).astype(np.float32) / (qmax - qmin)
  zero_point = np.zeros(shape, np.int32) if symmetric else rng.integers(qmin, qmax + 1, shape)
  return x, scale, zero_point.astype(np.int32), qmin, qmax


CASES = [(b, s, a) for b in (2, 4, 8) for s in (True, False) for a in (None, 0, 1, -1)]


@pytest.mark.parametrize("bits,symmetric,axis", CASES)
def test_forward_and_backward_match_numpy_oracle(bits, symmetric, axis):
  x, scale, zp, qmin, qmax = make_case(bits, symmetric, axis)
  want, mask = np_fake_quant(x, scale, zp, qmin, qmax)
  got = fake_quant(x, scale, zp, qmin=qmin, qmax=qmax)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  upstream = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(fake_quant(v, scale, zp, qmin=qmin, qmax=qmax) * upstream))(x)
  np.testing.assert_array_equal(grad, upstream * mask)
  assert 0 < mask.mean() < 1  # the case exercises both clipped and representable values


@pytest.mark.parametrize("bits,symmetric,axis", CASES[::3])
def test_outputs_lie_on_the_grid_and_are_idempotent(bits, symmetric, axis):
  x, scale, zp, qmin, qmax = make_case(bits, symmetric, axis, seed=2)
  out = np.asarray(fake_quant(x, scale, zp, qmin=qmin, qmax=qmax))
  codes = out / scale + zp
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3
  again = fake_quant(out, scale, zp, qmin=qmin, qmax=qmax)
  np.testing.assert_array_equal(again, out)


def test_hand_computed_values_round_half_to_even():
  # 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2; -1.25 / 0.5 = -2.5 -> -2; 9 clips to 7.
  got = fake_quant(jnp.array([0.25, 0.75, -1.25, 9.0]), 0.5, 0, qmin=-8, qmax=7)
  np.testing.assert_array_equal(got, [0.0, 1.0, -1.0, 3.5])
  # Asymmetric: zero point 3 shifts the representable range to [-1.5, 6.0].
  got = fake_quant(jnp.array([-5.0, 0.0, 2.2]), 0.5, 3, qmin=0, qmax=15)
  np.testing.assert_array_equal(got, [-1.5, 0.0, 2.0])


def test_numpy_codes_by_hand_and_as_quantize_int_gives_them():
  # 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2; -1.25 / 0.5 = -2.5 -> -2; -0.0 -> 0; +3; clip.
  x = np.array([[0.25, 0.75, -1.25, -0.0, 9.0, -9.0]], np.float32)
  got = quantize_int_numpy(x, np.float32(0.5), np.int32(3), qmin=0, qmax=15)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, [[3, 5, 1, 3, 15, 0]])
  with pytest.raises(ConfigError, match=r"^scale must be finite and > 0 everywhere, got 0\.0"):
    quantize_int_numpy(x, 0.0, 0, qmin=0, qmax=15)
  # Per channel (columns), with zero points, exact ties among the values; NumPy and JAX alike.
  rng = np.random.default_rng(0)
  for bits in (2, 4, 8):
    w = (rng.standard_normal((64, 6)) * rng.uniform(0.01, 3, 6)).astype(np.float32)
    w[:8] = np.round(w[:8] * 4) / 4  # exact ties on a grid of quarters
    scale = rng.choice([0.5, 0.25, 0.1, 0.3, 1 / 3, 0.07], 6).astype(np.float32)
    zp = rng.integers(0, 1 << bits, 6).astype(np.int32)
    qmin, qmax = 0, (1 << bits) - 1
    want = np.clip(np.round(w * (np.float32(1) / scale)) + zp.astype(np.float32), qmin, qmax)
    got = quantize_int_numpy(w, scale, zp, qmin=qmin, qmax=qmax)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.asarray(quantize_int(w, scale, zp, qmin=qmin,
                                                               qmax=qmax)))


def test_gradient_is_one_inside_zero_outside_the_range():
  x = jnp.array([-4.4, -4.0, 0.3, 3.5, 3.76, 100.0])
  grad = jax.grad(lambda v: fake_quant(v, 0.5, 0, qmin=-8, qmax=7).sum())(x)
  # round(x / 0.5) = -9 (out), -8, 1, 7, 8 (out: 7.52 rounds to 8), 200 (out)
  np.testing.assert_array_equal(grad, [0, 1, 1, 1, 0, 0])


def test_second_derivatives_are_straight_through():
  # d/dx sum(fq(x)^2) = 2 fq(x) * inside, so the Hessian is diag(2 * inside), not 0 (the
  # derivative of jnp.round): HVPs and jax.hessian through a fake-quant model see curvature.
  x = jnp.array([-4.4, -4.0, 0.3, 3.5, 3.76, 100.0])
  f = lambda v: fake_quant(v, 0.5, 0, qmin=-8, qmax=7)  # noqa: E731
  np.testing.assert_array_equal(jax.hessian(lambda v: jnp.sum(f(v) ** 2))(x),
                                np.diag([0.0, 2, 2, 2, 0, 0]))
  np.testing.assert_array_equal(jax.jacfwd(f)(x), np.diag([0.0, 1, 1, 1, 0, 0]))


def test_int_codes_dequantize_to_fake_quant():
  x, scale, zp, qmin, qmax = make_case(4, False, 1, seed=3)
  codes = quantize_int(x, scale, zp, qmin=qmin, qmax=qmax)
  assert codes.dtype == jnp.int32 and int(codes.min()) >= qmin and int(codes.max()) <= qmax
  np.testing.assert_allclose(dequantize(codes, scale, zp),
                             fake_quant(x, scale, zp, qmin=qmin, qmax=qmax), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [None, 3])
def test_codes_are_the_same_eagerly_and_in_a_compiled_step(axis):
  """The symmetric grid puts -max|w| on an exact tie (-3.5 at 3 bits): the export's eager codes
  and the model's compiled fake quantization must round it alike (a compiled x / scale became
  x * (1 / scale) and picked the other code in 13 % of per-tensor kernels)."""
  from jaxcompress.quantization.qparams import minmax_qparams
  qparams = jax.jit(lambda w: minmax_qparams(w, bits=3, axis=axis, symmetric=True))
  def quantized(w):
    scale, zero_point, qmin, qmax = minmax_qparams(w, bits=3, axis=axis, symmetric=True)
    return fake_quant(w, scale, zero_point, qmin=qmin, qmax=qmax)

  model = jax.jit(quantized)
  rng = np.random.default_rng(0)
  for _ in range(60):
    w = (rng.normal(size=(3, 3, 4, 8)) * rng.uniform(0.01, 3)).astype(np.float32)
    scale, zero_point, qmin, qmax = qparams(w)
    codes = np.asarray(quantize_int(w, scale, zero_point, qmin=qmin, qmax=qmax))
    np.testing.assert_array_equal(np.asarray(model(w)),
                                  np.asarray(dequantize(codes, scale, zero_point)))
    oracle = np.clip(np.round(w * (np.float32(1) / np.asarray(scale, np.float32))), qmin, qmax)
    np.testing.assert_array_equal(codes, oracle)  # NumPy, the same product
    # The export's NumPy codes: the same integers.
    np.testing.assert_array_equal(quantize_int_numpy(w, np.asarray(scale), np.asarray(zero_point),
                                                     qmin=qmin, qmax=qmax), codes)


def test_traced_qmin_qmax_under_jit():
  x, scale, zp, _, _ = make_case(4, True, None, seed=4)
  f = jax.jit(lambda v, lo, hi: fake_quant(v, scale, zp, qmin=lo, qmax=hi))
  for bits in (2, 4, 8):
    qmin, qmax = grid(bits, True)
    np.testing.assert_allclose(f(x, qmin, qmax), np_fake_quant(x, scale, zp, qmin, qmax)[0],
                               rtol=1e-6, atol=1e-7)


def test_keeps_input_dtype():
  x = jnp.linspace(-1, 1, 7, dtype=jnp.bfloat16)
  assert fake_quant(x, 0.25, 0, qmin=-4, qmax=3).dtype == jnp.bfloat16


@pytest.mark.parametrize("scale,match", [
    (0.0, r"scale must be finite and > 0 everywhere, got 0\.0"),
    (-0.1, r"scale must be finite and > 0 everywhere, got -0\.1"),
    (np.array([0.1, 0.0]), r"scale must be finite and > 0 everywhere, got \[0\.0\]"),
    (np.nan, r"scale must be finite and > 0 everywhere, got nan"),
])
def test_bad_scale_raises(scale, match):
  with pytest.raises(ConfigError, match=match):
    fake_quant(jnp.ones(2), scale, 0, qmin=0, qmax=15)


@pytest.mark.parametrize("qmin,qmax", [(0, 0), (7, -8), (np.nan, 7)])
def test_qmin_not_below_qmax_raises(qmin, qmax):
  with pytest.raises(ConfigError, match=rf"qmin must be < qmax, got qmin={qmin}, qmax={qmax}"):
    fake_quant(jnp.ones(2), 0.1, 0, qmin=qmin, qmax=qmax)


@pytest.mark.parametrize("qmin, qmax, field", [(-8.5, 7, "qmin"), (-8, 6.5, "qmax"),
                                               (-8, np.inf, "qmax")])
def test_a_code_bound_that_is_no_integer_is_one_line(qmin, qmax, field):
  # qmin -8.5 with scale 0.1: fake_quant clipped -1.0 to -0.85, on no grid of step 0.1, while
  # quantize_int stored int32(-8.5) = -8, read back as -0.8 (by hand); qmax inf clipped nothing.
  match = rf"^{field} must be an integer code \(every value on the grid is one\), got "
  for fn in (fake_quant, quantize_int, quantize_int_numpy):
    with pytest.raises(ConfigError, match=match):
      fn(jnp.array([-1.0, 2.0]), 0.1, 0, qmin=qmin, qmax=qmax)
  with pytest.raises(ConfigError, match=match):
    qparams_from_range(-1.0, 1.0, qmin=qmin, qmax=qmax, symmetric=False)


@pytest.mark.parametrize("kwargs,field,shape", [
    (dict(scale=np.full(5, 0.1), zero_point=0), "scale", r"\(5,\)"),
    (dict(scale=0.1, zero_point=np.zeros(4, np.int32)), "zero_point", r"\(4,\)"),
    # broadcasts, but to another shape than x's: the output would silently grow
    (dict(scale=np.full((2, 1, 1), 0.1), zero_point=0), "scale", r"\(2, 1, 1\)")])
def test_a_scale_or_zero_point_of_another_shape_is_one_line(kwargs, field, shape):
  x = jnp.ones((3, 2))
  match = (rf"^{field} must be a scalar or an array broadcastable against x of shape \(3, 2\) "
           rf".*got 'of shape {shape}'$")
  for fn in (fake_quant, quantize_int, quantize_int_numpy):
    with pytest.raises(ConfigError, match=match):
      fn(x, qmin=-8, qmax=7, **kwargs)


@pytest.mark.parametrize("zero_point, bad", [(300, "300"),
                                             (np.array([4, -1], np.int32), r"\[-1\]")])
def test_a_zero_point_off_the_grid_is_one_line(zero_point, bad):
  # Real 0 has the code zero_point, which the grid [0, 255] must hold (PyTorch refuses another);
  # 300 dequantized 0.5 to (255 - 300) * 0.1 = -4.5 and 0.0 to -4.5 too.
  match = rf"^zero_point must be in \[qmin, qmax\] = \[0, 255\] .*, got {bad};"
  for fn in (fake_quant, quantize_int, quantize_int_numpy):
    with pytest.raises(ConfigError, match=match):
      fn(jnp.array([0.5, 0.0]), 0.1, zero_point, qmin=0, qmax=255)


@pytest.mark.parametrize("zero_point, bad", [(0.5, "0.5"), (np.nan, "nan"),
                                             (np.array([4.0, 2.25]), r"\[2.25\]")])
def test_a_zero_point_that_is_no_integer_is_one_line(zero_point, bad):
  # zero_point 0.5: fake_quant gave 0.26 -> (round(2.6) + 0.5 - 0.5) * 0.1 = 0.3, while
  # quantize_int stored the code int32(3.5) = 3, read back as (3 - 0.5) * 0.1 = 0.25; -1.0
  # clipped to code 0 gave (0 - 0.5) * 0.1 = -0.05, on no grid of step 0.1 (by hand).
  match = rf"^zero_point must be integer codes \(the code of the real value 0\), got {bad};"
  for fn in (fake_quant, quantize_int, quantize_int_numpy):
    with pytest.raises(ConfigError, match=match):
      fn(jnp.array([0.26, -1.0]), 0.1, zero_point, qmin=0, qmax=255)


def test_a_float64_scale_gives_the_float32_grid_with_x64_on():
  # Under x64 a NumPy float64 scale multiplied the codes in float64: 184 of these 1001 values
  # rounded off the float32 grid k * float32(0.1) (the export's), and dequantize was float64.
  x = np.linspace(-13, 13, 1001).astype(np.float32)
  scale = np.float32(0.1)
  codes = np.clip(np.round(x * (np.float32(1) / scale)), -128, 127)
  jax.config.update("jax_enable_x64", True)
  try:
    got = fake_quant(x, np.float64(0.1), np.int64(0), qmin=-128, qmax=127)
    back = dequantize(quantize_int(x, np.float64(0.1), 0, qmin=-128, qmax=127), np.float64(0.1),
                      np.int64(0))
  finally:
    jax.config.update("jax_enable_x64", False)
  assert got.dtype == back.dtype == jnp.float32
  np.testing.assert_array_equal(got, codes * scale)
  np.testing.assert_array_equal(back, codes * scale)
