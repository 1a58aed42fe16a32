import sys, torch
from pathlib import Path
from lowbit.export.api import load_run
from lowbit.data import BatchLoader
from lowbit.fit import FreezeBatchNorm, FitState
from lowbit.train import recalibrate_bn
torch.set_num_threads(1)
run = Path(sys.argv[1])
cfg, data, model = load_run(run)
ld = BatchLoader(data.train, data.info, 128, shuffle=True, seed=7)
batches = [b for _, b in zip(range(12), ld)]
def acc(mode):
    c = n = 0
    with torch.no_grad():
        for x, y in batches:
            if mode == "batch": model.train()
            elif mode == "frozen":
                model.train(); FreezeBatchNorm(0).on_epoch_start(FitState(model, None, None, None, 1, 1, torch.device("cpu")))
            else: model.eval()
            # batch mode updates running stats: keep them
            sd = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            out = model(x)
            model.load_state_dict(sd, strict=False)
            c += (out.argmax(1) == y).sum().item(); n += len(y)
    model.eval()
    return round(100 * c / n, 2)
print(run, "batch-stat", acc("batch"), "frozen", acc("frozen"), "integer eval", acc("eval"))
recalibrate_bn(model, BatchLoader(data.train, data.info, 128, shuffle=True, seed=3), 20)
print("after recal 20: frozen", acc("frozen"), "integer eval", acc("eval"))
