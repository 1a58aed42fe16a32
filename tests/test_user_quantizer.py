"""A user's own quantizer (README "Quantizers"): a missing piece is one clear line, and the shared clip-round gives a
learned lower bound its gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import quantize
from lowbit.errors import ConfigError
from lowbit.export.levels import act_quant
from lowbit.quant import Quantizer, register_quantizer
from lowbit.quant.base import _REGISTRY, round_ste


@pytest.fixture
def unregister():
    names = []
    yield names
    for n in names:
        _REGISTRY._entries.pop(n, None)


def test_registering_a_quantizer_without_quantize_is_one_clear_error(unregister):
    unregister.append("t_noquant")
    with pytest.raises(TypeError, match="implements quantize"):
        @register_quantizer("t_noquant")
        class NoQuantize(Quantizer):
            roles = ("weight", "act")


def test_a_quantizer_that_records_no_levels_is_named_not_called_unrun(unregister):
    unregister.append("t_norec")

    @register_quantizer("t_norec")
    class NoRecord(Quantizer):
        roles = ("weight", "act")

        def quantize(self, x):
            return round_ste(x)

    q = NoRecord(4, "act")
    with pytest.raises(ConfigError, match="has not run yet"):  # not called yet: as before
        act_quant(q, "0")
    q(torch.randn(10))
    with pytest.raises(ConfigError, match=r"recorded no levels: call self.record_levels"):
        act_quant(q, "0")


def test_clip_round_gives_a_learned_low_its_gradient():
    class LearnedRange(Quantizer):
        roles = ("act",)

        def __init__(self, bits, role="act"):
            super().__init__(bits, role)
            self.low, self.high = nn.Parameter(torch.tensor(-1.0)), nn.Parameter(torch.tensor(1.0))

        def quantize(self, x):
            return self.clip_round(x, self.low, self.high)

    q = LearnedRange(2)
    x = torch.linspace(-3, 3, 601)
    q(x).sum().backward()
    assert q.low.grad is not None and float(q.low.grad) == float((x < -1).sum())  # mirror of PACT's 1[x > high]
    assert float(q.high.grad) == float((x > 1).sum())


def test_clip_round_gives_a_learned_per_channel_high_its_gradient():
    class PerChannelClip(Quantizer):
        supports_per_channel = True

        def __init__(self, bits, role="weight", per_channel=True):
            super().__init__(bits, role, per_channel)
            self.high = nn.Parameter(torch.ones(4, 1))

        def quantize(self, x):
            return self.clip_round(x, -self.high.detach(), self.high)

    q = PerChannelClip(2)
    x = torch.linspace(-3, 3, 40).reshape(4, 10)
    q(x).sum().backward()  # was: RuntimeError, a 0-dim gradient for a (4, 1) parameter
    assert q.high.grad.flatten().tolist() == (x > 1).sum(1).float().tolist()


def test_a_notebook_cell_run_twice_registers_its_quantizer_again():
    """Running the cell that defines and registers a quantizer a second time raised "already registered"; the same
    definition (module and qualified name) now replaces it. Another object under a taken name, or a built-in's name,
    stays an error naming who holds it."""
    import lowbit.quant.base as qbase
    from lowbit.quant import Quantizer, build_quantizer, register_quantizer

    def cell():
        @register_quantizer("cell_q")
        class CellQ(Quantizer):
            min_bits, max_bits = 1, 8

            def quantize(self, x):
                return self.clip_round(x, torch.tensor(0.0), torch.tensor(1.0))

        return CellQ

    try:
        first, second = cell(), cell()
        assert type(build_quantizer("cell_q", 2)) is second is not first

        class Other(Quantizer):
            def quantize(self, x):
                return x

        with pytest.raises(ConfigError, match=r"quantizer 'cell_q' is already registered \(by .*cell.<locals>.CellQ\)"):
            register_quantizer("cell_q")(Other)
        with pytest.raises(ConfigError, match=r"quantizer 'pact' is already registered \(by lowbit.quant"):
            register_quantizer("pact")(Other)
    finally:
        qbase._REGISTRY._entries.pop("cell_q", None)
