"""``pyro_symmetry._shapes.broadcast_shapes`` against ``torch.broadcast_shapes``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyro_symmetry._shapes import broadcast_shapes

shapes = st.lists(st.integers(0, 3), max_size=4).map(tuple)


@given(st.lists(shapes, max_size=4))
def test_same_result_or_same_error_type_as_torch(many):
    try:
        expected = torch.broadcast_shapes(*many)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="cannot be broadcast"):
            broadcast_shapes(*many)
    else:
        got = broadcast_shapes(*many)
        assert isinstance(got, torch.Size) and got == expected


def test_sizes_and_examples():
    assert broadcast_shapes() == torch.Size([])
    assert broadcast_shapes(torch.Size([8, 1, 3]), (5, 1), ()) == torch.Size([8, 5, 3])
    assert broadcast_shapes((0,), (1,)) == torch.Size([0])
    with pytest.raises(RuntimeError):
        broadcast_shapes((2,), (3,))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace itself
def test_under_jit_tracing_the_sizes_are_not_frozen():
    def f(x, y):
        return torch.zeros(broadcast_shapes(x.shape, y.shape))

    traced = torch.jit.trace(f, (torch.ones(3, 1), torch.ones(4)), check_trace=False)
    assert traced(torch.ones(3, 1), torch.ones(4)).shape == (3, 4)
    assert traced(torch.ones(5, 1), torch.ones(2)).shape == (5, 2)
