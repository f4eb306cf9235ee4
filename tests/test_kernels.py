"""The compiled sampled-dot kernel agrees with the pure-torch path and with a dense product."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sparseft.kernels import compiled_library, sampled_dot, sampled_dot_and_colsum, sampled_dot_torch

needs_c = pytest.mark.skipif(compiled_library() is None, reason="no C compiler for the fast kernel")


def _case(t, r, c, nnz, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(t, r, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(t, c, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, r, (nnz,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, c, (nnz,), generator=g, dtype=torch.int32)
    return grad, x, rows, cols


@needs_c
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 300), r=st.integers(1, 40), c=st.integers(1, 40), nnz=st.integers(0, 60),
       seed=st.integers(0, 1000), one_per_row=st.booleans())
def test_c_kernel_matches_dense_float64(t, r, c, nnz, seed, one_per_row):
    grad, x, rows, cols = _case(t, r, c, nnz, torch.float64, seed)
    if one_per_row:  # entry i in row i, GPS with K=1: the kernel reads the gradient rows contiguously
        rows, cols = torch.arange(min(nnz, r), dtype=torch.int32), cols[:r]
    dense = grad.t() @ x
    expected = dense[rows.long(), cols.long()]
    got = sampled_dot(grad, x, rows, cols, backend="c")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sampled_dot_torch(grad, x, rows, cols), expected, rtol=1e-12, atol=1e-12)


@needs_c
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 300), r=st.integers(1, 40), c=st.integers(1, 40), nnz=st.integers(0, 60),
       seed=st.integers(0, 1000), one_per_row=st.booleans(), pad=st.integers(0, 5))
def test_bf16_kernel_equals_the_exact_products_of_its_inputs(t, r, c, nnz, seed, one_per_row, pad):
    """bfloat16 inputs are widened exactly (x a tile at a time into a buffer); only the float32 sums round."""
    grad, x, rows, cols = _case(t, r, c, nnz, torch.bfloat16, seed)
    if one_per_row:
        rows, cols = torch.arange(min(nnz, r), dtype=torch.int32), cols[:r]
    wide = torch.zeros(t, c + pad, dtype=torch.bfloat16)
    wide[:, :c] = x
    x_view = wide[:, :c]  # row stride c + pad: read in place
    expected = (grad.double().t() @ x.double())[rows.long(), cols.long()]
    got = sampled_dot(grad, x_view, rows, cols, backend="c")
    assert got.dtype == torch.float32
    scale = grad.double().abs().t() @ x.double().abs()  # the sum of |terms| bounds float32's rounding
    bound = scale[rows.long(), cols.long()] * t * 2 ** -23 + 1e-30
    assert ((got.double() - expected).abs() <= bound).all()


@needs_c
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_c_kernel_matches_torch_path(dtype, tol):
    grad, x, rows, cols = _case(777, 50, 70, 500, dtype)
    c = sampled_dot(grad, x, rows, cols, backend="c")
    ref = sampled_dot_torch(grad, x, rows, cols)
    assert c.dtype == torch.float32 and ref.dtype == torch.float32
    scale = ref.abs().max()
    assert ((c - ref).abs().max() / scale) < tol


@needs_c
@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 300), r=st.integers(1, 40), c=st.integers(1, 40), nnz=st.integers(0, 60),
       seed=st.integers(0, 1000), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       pad=st.integers(0, 3))
def test_column_sums_come_with_the_products_from_one_read(t, r, c, nnz, seed, dtype, pad):
    """The bias gradient summed alongside the sampled products: Σ_t g[t, :] for every column of g (also those
    no entry reads), the products unchanged, on both backends; g read in place at any row stride."""
    grad, x, rows, cols = _case(t, r, c, nnz, dtype, seed)
    wide = torch.zeros(t, r + pad, dtype=dtype)
    wide[:, :r] = grad
    expected = grad.double().sum(0)
    bound = grad.double().abs().sum(0) * t * 2 ** -23 + 1e-30  # float32 sums of |terms| bound the rounding
    for backend in ("c", "torch"):
        products, sums = sampled_dot_and_colsum(wide[:, :r], x, rows, cols, backend=backend)
        assert sums.shape == (r,) and sums.dtype == products.dtype
        torch.testing.assert_close(products, sampled_dot(grad, x, rows, cols, backend=backend), rtol=0, atol=0)
        if dtype == torch.float64:
            torch.testing.assert_close(sums, expected, rtol=1e-12, atol=1e-12)
        else:
            assert ((sums.double() - expected).abs() <= bound).all()


@needs_c
def test_c_kernel_handles_strided_rows():
    grad, x, rows, cols = _case(64, 30, 20, 40, torch.float32)
    wide = torch.randn(64, 50)
    wide[:, 5:35] = grad
    view = wide[:, 5:35]  # row stride 50, unit column stride: used without a copy
    torch.testing.assert_close(sampled_dot(view, x, rows, cols, backend="c"), sampled_dot_torch(grad, x, rows, cols))
    transposed = x.t().contiguous().t()  # column-major: copied first
    torch.testing.assert_close(sampled_dot(grad, transposed, rows, cols, backend="c"),
                               sampled_dot_torch(grad, x, rows, cols))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="sampled_dot needs"):
        sampled_dot(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(1, dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one dtype"):
        sampled_dot(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_channels_first_kernel_matches_dense(dtype, tol):
    from sparseft.kernels import sampled_dot_channels_first

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(5, 24, 6, 7, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(5, 16, 6, 7, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, 24, (50,), generator=g)
    cols = torch.randint(0, 16, (50,), generator=g)
    dense = torch.einsum("bohw,bihw->oi", grad.double(), x.double())[rows, cols]
    for backend in ("c", "torch"):
        if backend == "c" and compiled_library() is None:
            continue
        got = sampled_dot_channels_first(grad, x, rows, cols, backend=backend).double()
        assert (got - dense).abs().max() / dense.abs().max() < tol, backend
    torch.testing.assert_close(sampled_dot_torch(grad, x, rows, cols).double(), dense,
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("stride,padding,dilation,kernel", [((1, 1), (1, 1), (1, 1), (3, 3)),
                                                             ((2, 2), (1, 1), (1, 1), (3, 3)),
                                                             ((1, 2), (0, 2), (2, 1), (3, 5)),
                                                             ((2, 2), (3, 3), (1, 1), (7, 7))])
def test_conv_kernel_matches_dense(stride, padding, dilation, kernel):
    from sparseft.kernels import sampled_conv_weight_grad, sampled_conv_weight_grad_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dense,) = torch.autograd.grad(y, w, grad_y)
    n = 40
    rows, cols = torch.randint(0, 6, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    ki, kj = torch.randint(0, kernel[0], (n,), generator=g), torch.randint(0, kernel[1], (n,), generator=g)
    expected = dense[rows, cols, ki, kj]
    args = (kernel, stride, padding, dilation)
    torch.testing.assert_close(sampled_conv_weight_grad_torch(grad_y, x, rows, cols, ki, kj, *args), expected)
    if compiled_library() is not None:
        got = sampled_conv_weight_grad(grad_y, x, rows, cols, ki, kj, *args, backend="c")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        got32 = sampled_conv_weight_grad(grad_y.float(), x.float(), rows, cols, ki, kj, *args, backend="c")
        torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


# -- the blocked conv kernels, through the sparse layers, against dense autograd -------------------

@st.composite
def conv_cases(draw):
    """A Conv2d geometry: 1x1 or kxk, strided, dilated, padded, grouped or depthwise; entries that share input
    channels (the blocked kernels' case: many per channel) or spread over them."""
    if draw(st.booleans()):  # the pointwise path (1x1, stride 1, ungrouped): its own kernel
        groups, cin, cout = 1, draw(st.integers(1, 6)), draw(st.integers(1, 40))
        kernel, stride, dilation, padding = (1, 1), (1, 1), (1, 1), (0, 0)
    else:
        groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
        if groups == "depthwise":
            groups = cin = cout = draw(st.integers(1, 12))
        else:
            cin = groups * draw(st.integers(1, 5))
            cout = groups * draw(st.integers(1, 12))
        kernel = draw(st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 5)]))
        stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
        dilation = draw(st.sampled_from([(1, 1), (1, 1), (2, 1)]))
        padding = (draw(st.integers(0, kernel[0])), draw(st.integers(0, kernel[1])))
    height = draw(st.integers(max(1, (kernel[0] - 1) * dilation[0] + 1 - 2 * padding[0]), 11))
    width = draw(st.integers(max(1, (kernel[1] - 1) * dilation[1] + 1 - 2 * padding[1]), 13))
    numel = cout * (cin // groups) * kernel[0] * kernel[1]
    nnz = draw(st.integers(1, numel))
    concentrated = draw(st.booleans())  # all entries on one input channel where the shape allows
    return dict(cin=cin, cout=cout, kernel=kernel, stride=stride, dilation=dilation, padding=padding,
                groups=groups, size=(height, width), nnz=nnz, batch=draw(st.integers(1, 3)),
                concentrated=concentrated, seed=draw(st.integers(0, 2**16)))


@given(case=conv_cases())
@settings(max_examples=150, deadline=None)
def test_blocked_conv_kernels_match_dense_autograd(case):
    from sparseft import sparse_layers

    g = torch.Generator().manual_seed(case["seed"])
    conv = torch.nn.Conv2d(case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"],
                           case["dilation"], case["groups"], bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    numel = conv.weight.numel()
    if case["concentrated"]:  # every entry of input channel 0 (of each group): shared planes
        shape = conv.weight.shape
        flat = torch.arange(numel).reshape(shape)[:, 0].reshape(-1)
        index = flat[torch.randperm(flat.numel(), generator=g)[:case["nnz"]]].sort().values
    else:
        index = torch.randperm(numel, generator=g)[:case["nnz"]].sort().values
    x = torch.randn(case["batch"], case["cin"], *case["size"], generator=g, dtype=torch.float64)

    dense_x = x.clone().requires_grad_(True)
    weight = conv.weight.detach().clone().requires_grad_(True)
    y = torch.nn.functional.conv2d(dense_x, weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                   conv.groups)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y)

    sparse_layers.install(conv, [("weight", index)])
    delta = conv.sparse_delta["weight"]
    assert delta.gathered  # the kernels' path, not the generic one
    sparse_x = x.clone().requires_grad_(True)
    y2 = conv(sparse_x)
    torch.testing.assert_close(y2, y.detach(), rtol=1e-12, atol=1e-12)
    y2.backward(grad_y)
    expected = weight.grad.reshape(-1)[index]
    torch.testing.assert_close(delta.values.grad, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sparse_x.grad, dense_x.grad, rtol=1e-10, atol=1e-10)
    if compiled_library() is not None:  # float32 and bf16 through the same kernels
        from sparseft.kernels import sampled_conv_weight_grad, sampled_dot_channels_first

        args = (delta.rows, delta.cpos)
        saved = x if delta.ucols is None else x.index_select(1, delta.ucols)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            gy, sx = grad_y.to(dtype), saved.to(dtype)
            if conv.forward.__func__ is sparse_layers._sparse_pointwise_forward:
                got = sampled_dot_channels_first(gy, sx, *args, backend="c")
            else:
                got = sampled_conv_weight_grad(gy, sx, *args, delta.ki, delta.kj, conv.kernel_size, conv.stride,
                                               conv.padding, conv.dilation, backend="c")
            ref = sampled_conv_weight_grad(gy.double(), sx.double(), *args, delta.ki, delta.kj, conv.kernel_size,
                                           conv.stride, conv.padding, conv.dilation, backend="torch")
            scale = ref.abs().max().clamp_min(1.0)
            assert ((got.double() - ref).abs().max() / scale) < tol, dtype


def test_blocked_kernels_do_not_depend_on_the_number_of_threads():
    from sparseft.kernels import sampled_conv_weight_grad, sampled_dot_channels_first

    if compiled_library() is None:
        pytest.skip("no compiled kernel")
    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(4, 40, 9, 9, generator=g), torch.randn(4, 12, 9, 9, generator=g)
    rows, cols = torch.randint(0, 40, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    ki, kj = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((sampled_dot_channels_first(grad, x, rows, cols, backend="c"),
                            sampled_conv_weight_grad(grad, x, rows, cols, ki, kj, (3, 3), (1, 1), (1, 1), (1, 1),
                                                     backend="c")))
    finally:
        torch.set_num_threads(threads)
    for pw, kxk in results[1:]:
        assert torch.equal(pw, results[0][0]) and torch.equal(kxk, results[0][1])


def _task_changes(weight, bias, tasks, nnz, g):
    """Random changes of `tasks` tasks: distinct entries (a count from 0 to nnz), values, a whole bias or none."""
    changes = []
    for _ in range(tasks):
        n = min(int(torch.randint(0, nnz + 1, (1,), generator=g)), weight.numel())
        index = torch.randperm(weight.numel(), generator=g)[:n].to(torch.int32)
        value = weight.reshape(-1)[index.long()] + torch.randn(n, generator=g, dtype=torch.float64).to(weight.dtype)
        b = None if bias is None or torch.rand(1, generator=g) < 0.3 else \
            bias + torch.randn(bias.shape, generator=g, dtype=torch.float64).to(bias.dtype)
        changes.append((index if n or torch.rand(1, generator=g) < 0.5 else None, value, b))
    return changes


def _task_weight(weight, bias, change):
    index, value, b = change
    w = weight.clone()
    if index is not None:
        w.view(-1)[index.long()] = value
    return w, (bias if b is None else b)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), tokens=st.integers(1, 9), i=st.integers(1, 12), o=st.integers(1, 12),
       tasks=st.integers(1, 4), nnz=st.integers(0, 30), seed=st.integers(0, 1000), with_bias=st.booleans(),
       in_order=st.booleans(), backend=st.sampled_from(["c", "torch"]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_correct_rows_equals_each_tasks_own_layer(batch, tokens, i, o, tasks, nnz, seed, with_bias, in_order,
                                                  backend, dtype):
    """Against each task's weight formed whole; items of no task (-1) stay bit-identical; GPS K=1's layout (one
    entry per row, in order) too."""
    from sparseft.kernels.correct import correct_rows

    if backend == "c" and compiled_library() is None:
        pytest.skip("no C compiler for the fast kernel")
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(o, i, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(o, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    x = torch.randn(batch, tokens, i, generator=g, dtype=torch.float64).to(dtype)
    y = torch.nn.functional.linear(x, weight, bias)
    task = torch.randint(-1, tasks, (batch,), generator=g)
    changes = _task_changes(weight, bias, tasks, nnz, g)
    if in_order:  # entry e in row e, one column each
        cols = torch.randint(0, i, (o,), generator=g)
        index = (torch.arange(o) * i + cols).to(torch.int32)
        changes[0] = (index, weight.reshape(-1)[index.long()] + 1.0, changes[0][2])
    want = y.clone()
    for n, k in enumerate(task.tolist()):
        if k >= 0:
            want[n] = torch.nn.functional.linear(x[n], *_task_weight(weight, bias, changes[k]))
    got = y.clone()
    correct_rows(got, x, task, weight, bias, changes, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got[task < 0], y[task < 0])


def test_correct_rows_refuses_mismatched_shapes():
    from sparseft.kernels.correct import correct_rows

    y, x = torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match=r"correct_rows needs \[B, T, O\] and \[B, T, I\]"):
        correct_rows(y, x, torch.zeros(2, dtype=torch.long), torch.zeros(4, 4), None, [(None, None, None)])


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), cx=st.integers(1, 6), size=st.integers(3, 9), groups=st.sampled_from([1, 2, 3]),
       kernel=st.sampled_from([(1, 1), (3, 3), (2, 3), (4, 4)]),
       stride=st.sampled_from([(1, 1), (2, 2), (4, 4), (1, 2)]),
       padding=st.sampled_from([(0, 0), (1, 1), (2, 0)]), dilation=st.sampled_from([(1, 1), (2, 1)]),
       tasks=st.integers(1, 3), nnz=st.integers(0, 20), seed=st.integers(0, 1000), with_bias=st.booleans(),
       backend=st.sampled_from(["c", "torch"]))
def test_correct_conv_equals_each_tasks_own_convolution(batch, cx, size, groups, kernel, stride, padding, dilation,
                                                        tasks, nnz, seed, with_bias, backend):
    """Against each task's weight formed whole and run as a (grouped) convolution on its items; items of no task
    stay bit-identical."""
    from sparseft.kernels.correct import correct_conv

    if backend == "c" and compiled_library() is None:
        pytest.skip("no C compiler for the fast kernel")
    assume(all(size + 2 * p - d * (k - 1) - 1 >= 0 for p, d, k in zip(padding, dilation, kernel)))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(2 * groups, cx, *kernel, generator=g, dtype=torch.float64)
    bias = torch.randn(2 * groups, generator=g, dtype=torch.float64) if with_bias else None
    x = torch.randn(batch, cx * groups, size, size, generator=g, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    task = torch.randint(-1, tasks, (batch,), generator=g)
    changes = _task_changes(weight, bias, tasks, nnz, g)
    want = y.clone()
    for n, k in enumerate(task.tolist()):
        if k >= 0:
            w, b = _task_weight(weight, bias, changes[k])
            want[n] = torch.nn.functional.conv2d(x[n:n + 1], w, b, stride, padding, dilation, groups)[0]
    got = y.clone()
    correct_conv(got, x, task, weight, bias, changes, stride, padding, dilation, groups, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[task < 0], y[task < 0])
