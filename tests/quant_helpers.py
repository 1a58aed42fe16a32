"""Helpers shared by the tests: quantizer checks, and small integer-mode networks."""

import math

import numpy as np
import torch


def randn(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def range_edges(lo: float, hi: float, dtype=torch.float32) -> torch.Tensor:
    """lo, hi, their neighbours in dtype, 0 (the inputs where a clip mask can be off by one)."""
    lo_t, hi_t = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
    up, dn = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
    return torch.stack([lo_t, hi_t, torch.nextafter(lo_t, up), torch.nextafter(lo_t, dn),
                        torch.nextafter(hi_t, up), torch.nextafter(hi_t, dn), torch.zeros((), dtype=dtype)])


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def assert_on_levels(y: torch.Tensor, lv: torch.Tensor) -> None:
    """Every value of y is exactly one of the levels (per tensor, or per output-channel row)."""
    if lv.dim() == 1:
        bad = ~torch.isin(y.detach(), lv)
        if bad.any():
            v = y.detach()[bad][:3]
            gap = (v[:, None] - lv[None, :]).abs().min(1).values
            raise AssertionError(
                f"{int(bad.sum())} of {y.numel()} outputs are not exactly in levels(): e.g. {v.tolist()} "
                f"lie {gap.tolist()} from the nearest level"
            )
    else:
        assert lv.shape[0] == y.shape[0]
        for c in range(y.shape[0]):
            bad = ~torch.isin(y[c].detach(), lv[c])
            assert not bad.any(), f"channel {c}: outputs {y[c][bad][:3].tolist()} not in row {lv[c].tolist()}"


def assert_close_off_ties(actual, expected, pre_round, atol=1e-6) -> None:
    """actual == expected (atol) wherever the pre-rounding value is not within 1e-4 of a .5 tie."""
    actual, expected, pre = (np.asarray(a, float).ravel() for a in (actual, expected, pre_round))
    frac = pre - np.floor(pre)
    ok = np.abs(frac - 0.5) > 1e-4
    assert ok.mean() > 0.99
    np.testing.assert_allclose(actual[ok], expected[ok], rtol=0, atol=atol)


def settled(m: torch.nn.Module, shape, plan, seed: int = 0, passes: int = 3, batch: int = 16) -> torch.nn.Module:
    """``m`` quantized by ``plan`` and run ``passes`` training-mode forwards on random batches (BatchNorm
    statistics and data-initialised quantizers settle), then put in eval mode: a network every backend can run."""
    from lowbit import quantize

    torch.manual_seed(seed)
    quantize(m, plan)
    m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(passes):
            m(torch.randn(batch, *shape, generator=g))
    return m.eval()


class OddKernelNet(torch.nn.Module):
    """Kernels the C kernel's fast loops do not special-case: 5x5 (padded, on the signed 8-bit image), 1x3
    with a horizontal stride of 2, 2x2 unpadded; odd output widths (a last output computed alone)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(1, 6, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 2, stride=2, bias=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))  # 11x11
        x = torch.relu(self.bn2(self.c2(x)))  # 11x6
        x = torch.relu(self.c3(x))  # 5x3
        return self.fc(torch.flatten(self.pool(x), 1))


class LoRALinear(torch.nn.Linear):
    """A LoRA-style linear: the torch layer plus a low-rank branch (its own nn.Linear children), in a forward of its
    own."""

    def __init__(self, i, o, r=2):
        super().__init__(i, o)
        self.lora_a, self.lora_b = torch.nn.Linear(i, r, bias=False), torch.nn.Linear(r, o, bias=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) + self.lora_b(self.lora_a(x))
