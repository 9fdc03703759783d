"""Tests for tinyclip/autograd.py: the engine itself.

The Functions here are tiny local ones (square, scale, add, ...) so that these
tests check the graph walk, accumulation, freeing and error paths without
depending on tinyclip/functional.py.
"""

import gc
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyclip as tc
from tinyclip import autograd, backend
from tinyclip import functional as F
from tinyclip.autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad, tensor, unbroadcast


class Square(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = x^2"""
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        """f'(x) = 2x"""
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Scale(Function):
    @staticmethod
    def forward(ctx, x, factor=2.0):
        """f(x) = c x"""
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, grad):
        """f'(x) = c"""
        return grad * ctx.factor


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        """f(a, b) = a + b, broadcasting"""
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        """df/da = df/db = 1; the very same array goes to both inputs when no broadcasting happened"""
        return unbroadcast(grad, ctx.shapes[0]), unbroadcast(grad, ctx.shapes[1])


class Identity(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = x"""
        return x.copy()

    @staticmethod
    def backward(ctx, grad):
        """f'(x) = 1: hands its incoming gradient on unchanged"""
        return grad


class Reshape(Function):
    float_inputs = False

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)   # a view of grad


class SumAll(Function):
    @staticmethod
    def forward(ctx, x):
        """f(x) = sum x"""
        ctx.shape = x.shape
        return x.sum(keepdims=True).reshape(())

    @staticmethod
    def backward(ctx, grad):
        """df/dx = 1 everywhere: a read-only broadcast view of the scalar gradient"""
        return np.broadcast_to(grad, ctx.shape)


class SaveCopy(Function):
    """f(x) = x^2, saving a fresh array that only the context holds (to watch it being freed)."""

    @staticmethod
    def forward(ctx, x):
        doubled = 2 * x
        ctx.save_for_backward(doubled)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (doubled,) = ctx.saved_tensors
        return doubled * grad


def leaf(values, dtype=np.float64):
    return tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# ---- accumulation -----------------------------------------------------------------------

def test_a_tensor_used_twice_gets_both_gradients():
    x = leaf([1.0, -2.0, 3.0])
    SumAll.apply(Add.apply(Square.apply(x), Scale.apply(x, factor=3.0))).backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 3.0)


def test_add_of_a_tensor_with_itself():
    x = leaf([1.0, 2.0])
    Add.apply(x, x).backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 20.0])


def test_gradients_flow_in_reverse_topological_order():
    # x -> a -> b, and c = a + b: a's gradient must be complete (1 + 3) before a's own backward runs.
    x = leaf([1.0, 2.0])
    a = Square.apply(x)
    c = Add.apply(a, Scale.apply(a, factor=3.0))
    c.backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, 8 * x.data)


def test_two_backward_calls_accumulate_and_zero_grad_resets():
    x = leaf([1.0, 2.0])
    for _ in range(2):
        SumAll.apply(Square.apply(x)).backward()
    np.testing.assert_array_equal(x.grad, 2 * (2 * x.data))
    x.zero_grad()
    assert x.grad is None


def test_only_tensors_that_require_grad_get_one():
    x, constant = leaf([1.0, 2.0]), tensor(np.array([3.0, 4.0]))
    out = Add.apply(x, constant)
    assert out.requires_grad and out._node is not None and not out.is_leaf
    out.backward(np.ones(2))
    assert constant.grad is None and out.grad is None   # only leaves keep .grad
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_needs_input_grad_tells_the_backward_which_inputs_want_a_gradient():
    seen = []

    class Spy(Function):
        @staticmethod
        def forward(ctx, a, b):
            seen.append(ctx.needs_input_grad)
            return a + b

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    Spy.apply(leaf([1.0]), np.array([2.0])).backward(np.ones(1))
    assert seen == [(True, False)]


def test_gradients_are_cast_to_the_input_dtype():
    class Float64Backward(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad.astype(np.float64) * 2

    x = leaf([1.0, 2.0], dtype=np.float32)
    Float64Backward.apply(x).backward(np.ones(2, np.float32))
    assert x.grad.dtype == np.float32


# ---- no_grad ----------------------------------------------------------------------------

def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = Square.apply(x)
    assert is_grad_enabled()
    assert not y.requires_grad and y._node is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward(np.ones(2))


def test_no_grad_is_restored_after_an_error_and_enable_grad_nests():
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("inside")
    assert is_grad_enabled()
    x = leaf([1.0])
    with no_grad():
        with enable_grad():
            assert Square.apply(x).requires_grad
        assert not Square.apply(x).requires_grad


# ---- errors -----------------------------------------------------------------------------

def test_backward_on_a_non_scalar_without_a_gradient_is_a_clear_error():
    y = Square.apply(leaf([1.0, 2.0]))
    with pytest.raises(RuntimeError, match=r"shape \(2,\) needs an explicit gradient"):
        y.backward()


def test_backward_with_a_gradient_of_the_wrong_shape():
    y = Square.apply(leaf([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"gradient shape \(3,\) does not match tensor shape \(2,\)"):
        y.backward(np.ones(3))


def test_a_one_element_output_has_an_implied_gradient_of_one():
    x = leaf([[3.0]])
    Square.apply(x).backward()
    np.testing.assert_array_equal(x.grad, [[6.0]])


def test_backward_twice_through_a_freed_graph_raises():
    x = leaf([1.0, 2.0])
    y = SumAll.apply(Square.apply(x))
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_backward_through_a_shared_part_that_was_freed_raises():
    x = leaf([1.0, 2.0])
    shared = Square.apply(x)
    first, second = SumAll.apply(shared), SumAll.apply(Scale.apply(shared))
    first.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        second.backward()


def test_backward_functions_that_break_the_contract_are_named():
    class TooMany(Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad, grad

    class WrongShape(Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad[:1]

    with pytest.raises(RuntimeError, match="TooMany.backward returned 2 gradients for 1 inputs"):
        TooMany.apply(leaf([1.0, 2.0])).backward(np.ones(2))
    with pytest.raises(RuntimeError, match=r"WrongShape.backward gave a gradient of shape \(1,\)"):
        WrongShape.apply(leaf([1.0, 2.0])).backward(np.ones(2))


@pytest.mark.parametrize("values", [np.arange(3), np.array([True, False])])
def test_integer_inputs_into_a_float_op_raise_naming_the_op(values):
    with pytest.raises(TypeError, match=r"square: input 0 has dtype .* needs floating-point inputs"):
        Square.apply(values)
    with pytest.raises(TypeError, match="square: input 0"):
        Square.apply(tensor(values))


def test_integer_inputs_pass_through_ops_that_allow_them():
    assert Reshape.apply(np.arange(6), shape=(2, 3)).dtype.kind == "i"


def test_python_numbers_take_the_float_type_of_the_other_inputs():
    for dtype in (np.float32, np.float64):
        x = leaf([1.0, 2.0], dtype=dtype)
        assert Add.apply(x, 2.0).dtype == dtype and Add.apply(3, x).dtype == dtype


def test_unsupported_inputs_are_named():
    with pytest.raises(TypeError, match="add: input 1 must be a Tensor, an array or a number, got str"):
        Add.apply(leaf([1.0]), "one")


def test_only_float_tensors_can_require_grad():
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        tensor(np.arange(3)).requires_grad_()
    with pytest.raises(RuntimeError, match="requires_grad_ is for leaf tensors"):
        Square.apply(leaf([1.0])).requires_grad_()


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_raises():
    cupy = backend.cupy_module()
    with pytest.raises(TypeError, match="add: inputs live on different backends"):
        Add.apply(np.ones(2), cupy.ones(2))
    with pytest.raises(TypeError, match="add: inputs live on different backends"):
        Add.apply(leaf([1.0, 2.0]), tensor(cupy.ones(2)))


@pytest.mark.gpu
def test_backward_on_cupy():
    cupy = backend.cupy_module()
    x = tensor(cupy.asarray([1.0, -2.0]), requires_grad=True)
    out = Add.apply(Square.apply(x), Scale.apply(x, factor=3.0))
    out.backward(cupy.ones(2))
    assert isinstance(x.grad, cupy.ndarray)
    np.testing.assert_array_equal(backend.to_numpy(x.grad), [5.0, -1.0])


# ---- memory -----------------------------------------------------------------------------

def test_saved_arrays_are_freed_after_backward():
    x = leaf([1.0, 2.0])
    y = SaveCopy.apply(Scale.apply(x, factor=5.0))
    node = y._node
    (saved,) = node.ctx.saved_tensors
    saved_ref = weakref.ref(saved)
    del saved
    y.backward(np.ones(2))
    gc.collect()
    assert saved_ref() is None, "the array saved for backward is still alive"
    assert node.ctx is None and node.inputs == ()
    np.testing.assert_array_equal(x.grad, 2 * 25 * x.data)


def test_release_keeps_needs_input_grad_and_drops_the_rest():
    ctx = autograd.Context((True, False))
    ctx.save_for_backward(np.ones(2))
    ctx.factor = 3.0
    ctx.release()
    assert ctx.needs_input_grad == (True, False)
    assert not hasattr(ctx, "factor") and not hasattr(ctx, "saved_tensors")


def test_a_deep_chain_does_not_hit_the_recursion_limit():
    x = leaf([1.0, -1.0])
    y = x
    for _ in range(10_000):
        y = Scale.apply(y, factor=1.0)
    y.backward(np.array([2.0, 3.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 3.0])


def test_a_deep_graph_dropped_without_backward_is_collected():
    x = leaf([1.0])
    y = x
    for _ in range(10_000):
        y = Scale.apply(y, factor=1.0)
    del y
    gc.collect()


# ---- independent leaf gradients ----------------------------------------------------------

def test_a_leaf_reached_through_two_paths_with_the_same_array_gets_its_own_grad():
    # Add hands one gradient array to both inputs; the leaf's .grad must not be that array.
    x = leaf([1.0, 2.0])
    incoming = np.array([1.0, 1.0])
    Add.apply(Identity.apply(x), Identity.apply(x)).backward(incoming)
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])
    np.testing.assert_array_equal(incoming, [1.0, 1.0])


def test_two_leaves_given_the_same_array_get_independent_grads():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    Identity.apply(Add.apply(a, b)).backward(np.array([1.0, 1.0]))
    assert a.grad is not b.grad and not np.shares_memory(a.grad, b.grad)
    a.grad *= 10.0
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_two_leaves_given_the_same_array_through_an_identity_get_independent_grads():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    Add.apply(a, Identity.apply(b)).backward(np.array([1.0, 1.0]))
    assert not np.shares_memory(a.grad, b.grad)


# A leaf's .grad is an array of its own: in-place updates of one gradient (clipping,
# zeroing, an optimiser) must never change another, nor the caller's array, nor fail on
# a read-only broadcast view.

def test_leaf_grads_never_share_memory_through_a_view():
    a, b = leaf([1.0, 2.0, 3.0, 4.0]), leaf([[1.0, 2.0], [3.0, 4.0]])
    Add.apply(a, Reshape.apply(b, shape=(4,))).backward(np.ones(4))
    assert not np.shares_memory(a.grad, b.grad)
    a.grad *= 10.0
    np.testing.assert_array_equal(b.grad, np.ones((2, 2)))


def test_leaf_grad_is_not_the_callers_gradient_array():
    x = leaf([1.0, 2.0])
    incoming = np.array([1.0, 1.0])
    Identity.apply(x).backward(incoming)
    assert not np.shares_memory(x.grad, incoming)


def test_leaf_grad_is_a_writable_array():
    x = leaf([1.0, 2.0, 3.0])
    SumAll.apply(x).backward()
    assert x.grad.flags.writeable
    x.grad *= 0.5
    np.testing.assert_array_equal(x.grad, [0.5, 0.5, 0.5])


# ---- unbroadcast ------------------------------------------------------------------------

@st.composite
def broadcast_pairs(draw):
    """(small, big): a shape and a shape it broadcasts up to (new leading axes, size-1 axes stretched)."""
    small = tuple(draw(st.lists(st.integers(1, 4), max_size=4)))
    leading = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    stretched = tuple(draw(st.integers(1, 4)) if size == 1 else size for size in small)
    return small, leading + stretched


@given(broadcast_pairs())
def test_unbroadcast_counts_the_broadcast_copies(pair):
    small, big = pair
    summed = unbroadcast(np.ones(big), small)
    assert summed.shape == small
    np.testing.assert_array_equal(summed, np.full(small, np.prod(big) / np.prod(small)))


@given(broadcast_pairs(), st.integers(0, 2**32 - 1))
def test_unbroadcast_is_the_adjoint_of_broadcasting(pair, seed):
    # <unbroadcast(g), a> == <g, broadcast_to(a)> for every g and a
    small, big = pair
    rng = np.random.default_rng(seed)
    grad, values = rng.standard_normal(big), rng.standard_normal(small)
    left = np.sum(unbroadcast(grad, small) * values)
    right = np.sum(grad * np.broadcast_to(values, big))
    assert left == pytest.approx(right, rel=1e-12, abs=1e-12)


def test_unbroadcast_of_a_matching_shape_is_the_same_array():
    grad = np.ones((2, 3))
    assert unbroadcast(grad, (2, 3)) is grad


# ---- tensor() ---------------------------------------------------------------------------

def test_tensor_dtype_rules():
    assert tensor(1.5).dtype == np.float32
    assert tensor([1.0, 2.0]).dtype == np.float32
    assert tensor([[1, 2]]).dtype.kind == "i"
    assert tensor(np.array([1.0], dtype=np.float64)).dtype == np.float64
    assert tensor(np.array([1.0], dtype=np.float16)).dtype == np.float16
    assert tensor([1.0], dtype=np.float64).dtype == np.float64
    assert tensor(np.array([1.0], dtype=np.float32), dtype=np.float64).dtype == np.float64
    assert tensor(np.array([1.0]), backend_name="numpy").dtype == np.float64


def test_tensor_follows_the_default_dtype():
    backend.set_default_dtype(np.float64)
    try:
        assert tensor(1.5).dtype == np.float64
    finally:
        backend.set_default_dtype(np.float32)


def test_tensor_wraps_arrays_and_unwraps_tensors():
    array = np.ones(3)
    t = tensor(array, requires_grad=True)
    assert t.data is array and t.requires_grad and t.grad is None
    assert tensor(t).data is array and not tensor(t).requires_grad
    assert isinstance(t, Tensor) and t.shape == (3,) and t.backend == "numpy"
    with pytest.raises(TypeError, match="use tinyclip.tensor"):
        Tensor([1.0, 2.0])


@pytest.mark.parametrize("call", [
    lambda t: F.add(t, None), lambda t: F.mul(None, t), lambda t: F.exp(None), lambda t: F.matmul(t, None),
    lambda t: t * None, lambda t: F.linear(t, None), lambda t: F.layer_norm(None),
], ids=["add", "mul", "exp", "matmul", "operator", "linear-weight", "layer-norm-input"])
def test_none_where_an_op_needs_an_input_is_a_type_error_naming_the_op(call):
    # None means "absent" only where an op has an optional input (a bias); anywhere else it would
    # reach the arithmetic (as NaN or a NumPy error deep inside), so the op refuses it by name
    with pytest.raises(TypeError, match=r"^\w+: input \d is None"):
        call(tc.tensor(np.ones((2, 2))))


@pytest.mark.parametrize("data", [None, [1.0, None], [[1.0], [None]], "1.0"], ids=["none", "list", "nested", "text"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_tensor_of_data_that_is_not_numbers_is_a_type_error(data, dtype):
    with pytest.raises(TypeError, match="tensor: data must be numbers"):
        tc.tensor(data, dtype=dtype)


def test_autograd_gets_its_operators_from_functional_and_never_imports_it():
    import ast
    import inspect
    from tinyclip import autograd
    imported = {f"{getattr(node, 'module', None) or ''}.{alias.name}"
                for node in ast.walk(ast.parse(inspect.getsource(autograd)))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not any("functional" in name for name in imported)
    assert tc.Tensor.__add__ is F.add and tc.Tensor.sum is F.sum      # attached by tinyclip.functional
