"""Which of integer mode's 8-bit ends costs accuracy, probed on trained networks of today's mode (issue 17).

Integer mode quantizes the layers today's mode keeps in FP32: the first conv (8-bit LSQ weights per channel,
the image by a signed 8-bit LSQ quantizer) and the classifier (8-bit LSQ weights per channel, its input by
the plan's quantizer at 8 bits). With the LSQ paper's initial step, 2·mean|v|/√Qp, those 8-bit grids are
coarse, and a 2-epoch fine-tune barely moves them (docs/integer-log.md). This script takes networks trained in
today's mode (FP32 ends) and puts one end at a time on such a grid, after training, on the run's first
``--images`` test images:

- the image on a signed 8-bit grid of step 0.16 (the step the ends' LSQ input quantizer has after
  today8e_fzl's fine-tunes: 18 of 256 codes in use) and of step max|x|/127 (every pixel level kept);
- the first conv's weights on the per-channel 8-bit grid of the paper's init (step 2·mean|w|/√127);
- the classifier's weights on that grid, and its input on an 8-bit PACT grid with α = 6 (the learned α).

    python benchmarks/integer_ends_probe.py FT_W4A4s_today_s3 FT_W4A4s_today_s4 FT_W8A8s_today_s3

(run folders under benchmarks/results/integer_export/mbv2_ft/runs, with their best.pt).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.quant.uniform import LSQQuantizer, PACTQuantizer

RUNS = Path("benchmarks/results/integer_export/mbv2_ft/runs")


def lsq_init_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` on the signed 8-bit per-channel grid of LSQ's initial step 2·mean|w|/√127: the ends' own
    quantizer (``LSQQuantizer``, init ``lsq``), which sets its step from the first tensor it sees."""
    return LSQQuantizer(8, "weight", per_channel=True)(w)


def signed8(step: float) -> LSQQuantizer:
    """The image's quantizer (signed 8-bit LSQ) with its step fixed at ``step``."""
    q = LSQQuantizer(8, "act", signed=True)
    q.step.data.fill_(step)
    q.initialized.fill_(True)
    return q


def probe(run: str, images: int) -> str:
    from lowbit.train import BatchLoader, load_run

    _, data, model, _ = load_run(RUNS / run)
    batches, n = [], 0
    for x, y in BatchLoader(data.test, data.info, 500):
        batches.append((x, y))
        n += len(y)
        if n >= images:
            break
    first, fc = model.features[0], model.fc
    if not (isinstance(first.weight, torch.nn.Parameter) and isinstance(fc.weight, torch.nn.Parameter)):
        raise SystemExit(f"{run}: its first conv or classifier is quantized; give a run of today's mode (FP32 ends)")

    def acc(image=None, fc_input=None) -> float:
        hook = fc.register_forward_pre_hook(lambda m, a: (fc_input(a[0]),)) if fc_input else None
        right = 0
        with torch.no_grad():
            for x, y in batches:
                right += (model(image(x) if image else x).argmax(1) == y).sum().item()
        if hook:
            hook.remove()
        return 100 * right / n

    base = acc()
    xmax = max(float(x.abs().max()) for x, _ in batches)
    rows = {"image step 0.16": acc(image=signed8(0.16)),
            "image step max/127": acc(image=signed8(xmax / 127)),
            "fc input pact8 α=6": acc(fc_input=PACTQuantizer(8, init=6.0))}
    for name, layer in (("first conv weights, lsq init grid", first), ("fc weights, lsq init grid", fc)):
        w = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.copy_(lsq_init_grid(w))
            rows[name] = acc()
            layer.weight.copy_(w)
    return f"{run} ({n} images): {base:.2f} % as trained; " + "; ".join(f"{k} {v - base:+.2f}" for k, v in rows.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for r in a.runs:
        print(probe(r, a.images), flush=True)


if __name__ == "__main__":
    main()
