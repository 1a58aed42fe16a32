import sys, torch
exec(open("benchmarks/results/integer_export/seeds_ft/freeze_probe/steps.py").read().split("lowbit.run(cfg")[0])
import importlib; F = importlib.import_module("lowbit.fit")
orig_start = F.FreezeBatchNorm.on_epoch_start
mode = sys.argv[3]
def on_start(self, state):
    orig_start(self, state)
    if state.epoch == self.after:
        if mode == "momentum":
            for st in state.optimizer.state.values():
                if "momentum_buffer" in st: st["momentum_buffer"].zero_()
        elif mode == "recal":
            from lowbit.train import recalibrate_bn
            from lowbit.data import load_dataset, BatchLoader
            d = load_dataset("fashion-mnist", limit=10000, val_fraction=0.05, seed=0)
            recalibrate_bn(state.model, BatchLoader(d.train, d.info, 128, shuffle=True, seed=0), 20)
            state.model.train(); orig_start(self, state)
F.FreezeBatchNorm.on_epoch_start = on_start
lowbit.run(cfg, Path(sys.argv[2]))
for s in losses[72:82]:
    print(s)
