import sys, torch, types
from torch import nn
exec(open("benchmarks/results/integer_export/seeds_ft/freeze_probe/steps.py").read().split("lowbit.run(cfg")[0])
import importlib; F = importlib.import_module("lowbit.fit")
mode = sys.argv[3]
cfg.train.freeze_bn_after = None  # freezing done here
orig3 = M.Method.train_step
def ts3(self, model, batch, opt, step):
    at = 112 if mode == "half" else 75
    if step >= at:
        if step == at and mode == "recal":
            from lowbit.train import recalibrate_bn
            from lowbit.data import load_dataset, BatchLoader
            d = load_dataset("fashion-mnist", limit=10000, val_fraction=0.05, seed=0)
            recalibrate_bn(model, BatchLoader(d.train, d.info, 128, shuffle=True, seed=0), 20)
            model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return orig3(self, model, batch, opt, step)
M.Method.train_step = ts3
lowbit.run(cfg, Path(sys.argv[2]))
print(mode, [round(l, 2) for _, l, _ in losses[72:90]])
