import sys, torch, types
import torch.nn.functional as Fn
from torch import nn
exec(open("benchmarks/results/integer_export/seeds_ft/freeze_probe/steps.py").read().split("lowbit.run(cfg")[0])
import importlib; F = importlib.import_module("lowbit.fit")

def st_forward(self, x):
    y_r = Fn.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    if not self._root.training:
        return y_r
    y_b = Fn.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    return y_b + (y_r - y_b).detach()

def on_start(self, state):
    if state.epoch >= self.after:
        for m in state.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
                if "forward" not in m.__dict__:
                    object.__setattr__(m, "_root", state.model)
                    m.forward = types.MethodType(st_forward, m)
F.FreezeBatchNorm.on_epoch_start = on_start
lowbit.run(cfg, Path(sys.argv[2]))
for s in losses[72:82]:
    print(s)
