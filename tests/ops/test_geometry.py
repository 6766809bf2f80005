import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppllava_jax.ops import pool_geometry


@pytest.mark.parametrize(
  "inp, kwargs, expected",
  [
    # The paper's settings: video (2,3,3) and image (1,3,3) on a 24x24 grid.
    ((32, 24, 24), dict(kernel=(2, 3, 3)), ((16, 8, 8), (2, 3, 3), (2, 3, 3))),
    ((1, 24, 24), dict(kernel=(1, 3, 3), stride=(1, 3, 3)), ((1, 8, 8), (1, 3, 3), (1, 3, 3))),
    ((64, 24, 24), dict(kernel=(4, 3, 3)), ((16, 8, 8), (4, 3, 3), (4, 3, 3))),
    # Odd frame count: the trailing frame is dropped, as in the original.
    ((33, 24, 24), dict(kernel=(2, 3, 3)), ((16, 8, 8), (2, 3, 3), (2, 3, 3))),
    # Output-size mode: stride = I // O, kernel = I - (O - 1) * stride.
    ((32, 24, 24), dict(output_size=(16, 8, 8)), ((16, 8, 8), (2, 3, 3), (2, 3, 3))),
    ((10, 24, 7), dict(output_size=(3, 5, 2)), ((3, 5, 2), (4, 8, 4), (3, 4, 3))),
    # Output + stride -> kernel; output + kernel -> stride.
    (
      (32, 24, 24),
      dict(output_size=(16, 8, 8), stride=(2, 3, 3)),
      ((16, 8, 8), (2, 3, 3), (2, 3, 3)),
    ),
    (
      (10, 24, 24),
      dict(output_size=(4, 8, 1), kernel=(3, 3, 5)),
      ((4, 8, 1), (3, 3, 5), (2, 3, 24)),
    ),
    # Overlapping windows.
    ((8, 6, 6), dict(kernel=(3, 3, 2), stride=(2, 1, 1)), ((3, 4, 5), (3, 3, 2), (2, 1, 1))),
  ],
)
def test_known_geometries(inp, kwargs, expected):
  assert pool_geometry(inp, **kwargs) == expected


@pytest.mark.parametrize(
  "inp, kwargs, words",
  [
    ((32, 24, 24), dict(kernel=(2, 25, 3)), ["height", "kernel larger than input", "25 > 24"]),
    ((32, 24, 24), dict(kernel=(0, 3, 3)), ["time", "kernel must be >= 1"]),
    ((32, 24, 24), dict(kernel=(2, 3, 3), stride=(2, -1, 3)), ["height", "stride must be >= 1"]),
    ((32, 0, 24), dict(kernel=(2, 1, 3)), ["height", "input size must be >= 1"]),
    ((32, 24, 24), dict(output_size=(33, 8, 8)), ["time", "output larger than input", "33 > 32"]),
    ((10, 24, 24), dict(output_size=(6, 8, 8), kernel=(3, 3, 3)), ["time", "not 6"]),
    (
      (32, 24, 24),
      dict(output_size=(16, 8, 8), kernel=(2, 3, 3), stride=(2, 3, 2)),
      ["width", "not 8"],
    ),
    ((32, 24, 24), dict(output_size=(16, 8, 8), stride=(3, 3, 3)), ["time", "do not fit"]),
    ((32, 24, 24), dict(stride=(2, 3, 3)), ["give output_size, kernel"]),
    ((32, 24), dict(kernel=(2, 3, 3)), ["input_size must be 3 ints"]),
    ((32, 24, 24), dict(kernel=2), ["kernel must be a 3-tuple"]),
  ],
)
def test_invalid_geometries_name_the_problem(inp, kwargs, words):
  with pytest.raises(ValueError) as err:
    pool_geometry(inp, **kwargs)
  for word in words:
    assert word in str(err.value), (word, str(err.value))


axis = st.integers(1, 40).flatmap(
  lambda size: st.tuples(st.just(size), st.integers(1, size), st.integers(1, size))
)


@settings(max_examples=200, deadline=None)
@given(st.tuples(axis, axis, axis))
def test_any_two_determine_the_third(axes):
  sizes = tuple(a[0] for a in axes)
  kernel = tuple(a[1] for a in axes)
  stride = tuple(a[2] for a in axes)
  out, k, s = pool_geometry(sizes, kernel=kernel, stride=stride)
  assert (k, s) == (kernel, stride)
  for i in range(3):
    assert out[i] == (sizes[i] - kernel[i]) // stride[i] + 1
    # The last window ends inside the input; one more would not fit.
    assert (out[i] - 1) * stride[i] + kernel[i] <= sizes[i] < out[i] * stride[i] + kernel[i]
  # Output + stride recovers a kernel with the same windows count (and start positions).
  out2, k2, s2 = pool_geometry(sizes, output_size=out, stride=stride)
  assert out2 == out and s2 == stride
  assert all((n - kk) // ss + 1 == o for n, kk, ss, o in zip(sizes, k2, s2, out))
  # Output alone gives windows that exactly cover the input.
  out3, k3, s3 = pool_geometry(sizes, output_size=out)
  assert out3 == out
  assert all((o - 1) * ss + kk == n for n, kk, ss, o in zip(sizes, k3, s3, out))
