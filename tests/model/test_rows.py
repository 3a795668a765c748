"""Decoding's few-row products over torch's threads (:mod:`megadistill.model.rows`).

The split must be the same function as ``F.linear`` (float64, any column count, bias or not),
must actually be taken where it is meant to be (one batched product, one block per thread), and
must leave the student's modules, state dict and decoding as they were.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from megadistill.model import HybridForCausalLM
from megadistill.model.rows import MAX_ROWS, RowLinear, row_linear, use_row_linear
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.decoding import make_both_branches_matter, stepped_with_cache


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


class BatchedProducts(TorchDispatchMode):
    """The shapes of the weights (second operands) of the ``bmm`` calls dispatched inside the
    block: a split product's is (blocks, in, columns per block)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_threads", [2, 3])
@pytest.mark.parametrize("out_features", [768, 1027])  # split evenly, and with columns left over
@pytest.mark.parametrize("shape", [(1, 96), (3, 1, 96), (MAX_ROWS, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_row_linear_is_f_linear(threads, num_threads, out_features, shape, bias):
    threads(num_threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, 96, generator=g, dtype=torch.float64)
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    with torch.no_grad(), BatchedProducts() as seen:
        got = row_linear(x, w, b)
    assert seen.shapes == [(num_threads, 96, out_features // num_threads)]  # a block per thread
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_row_linear_falls_back_where_the_split_does_not_apply(threads):
    threads(2)
    w = torch.randn(512, 32)
    cases = {
        "one thread": (torch.randn(1, 32), w, 1, False),
        "too many rows": (torch.randn(MAX_ROWS + 1, 32), w, 2, False),
        "autograd on": (torch.randn(1, 32), w, 2, True),
        "blocks too small": (torch.randn(1, 32), w[:255], 2, False),
        "a strided weight": (torch.randn(1, 32), torch.randn(32, 512).t(), 2, False),
    }
    for name, (x, weight, n, grad) in cases.items():
        threads(n)
        with torch.set_grad_enabled(grad), BatchedProducts() as seen:
            got = row_linear(x, weight)
        assert seen.shapes == [], name
        torch.testing.assert_close(got, F.linear(x, weight), msg=name)


def test_use_row_linear_changes_the_class_only():
    model = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 4, bias=False))
    before = model.state_dict(keep_vars=True)
    assert use_row_linear(model) == 2
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert [type(m) for m in model] == [RowLinear, nn.ReLU, RowLinear]


def test_the_student_and_a_loaded_student_use_row_linear(tmp_path):
    teacher = tiny_teacher("llama", seed=0)
    student, _ = convert(teacher, seed=0, window=8, num_sinks=2, chunk_size=4)
    student.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path)
    for model in (student, loaded):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is RowLinear for m in linears)


@pytest.mark.parametrize("mix", ["gate", "shared_norm"])
def test_decoding_with_two_threads_is_decoding_with_one(threads, mix):
    # Float64 logits of a prefill then steps, 2 threads (lm_head and the MLPs split) vs 1.
    teacher = tiny_teacher("llama", seed=0, intermediate_size=512)
    student, _ = convert(
        teacher, seed=0, mix=mix, window=8, num_sinks=2, chunk_size=4, softmax_heads=[[1, 0]]
    )
    student = make_both_branches_matter(student.double().eval())
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    threads(1)
    want, _ = stepped_with_cache(student, ids, 5)
    threads(2)
    with BatchedProducts() as seen:
        got, _ = stepped_with_cache(student, ids, 5)
    # every one of the 25 steps: the LM head (256 columns), and gate_proj and up_proj (512) of
    # both layers, each split in two blocks (the 10-row prefill is not split)
    assert seen.shapes.count((2, 64, 128)) == 25
    assert seen.shapes.count((2, 64, 256)) == 25 * 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
