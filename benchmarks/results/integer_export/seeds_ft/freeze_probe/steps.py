import sys, torch, json
from pathlib import Path
import lowbit
from lowbit.config import Config
import yaml
torch.set_num_threads(1)
src = Path(sys.argv[1])
cfg = Config.model_validate(yaml.safe_load((src / "config.yaml").read_text()))
import lowbit.methods as M
losses = []
orig = M.Method.train_step
def ts(self, model, batch, opt, step):
    r = orig(self, model, batch, opt, step)
    losses.append((step, round(r.loss.item(), 3), round((r.output.argmax(1) == batch[1]).float().mean().item(), 3)))
    return r
M.Method.train_step = ts
lowbit.run(cfg, Path(sys.argv[2]))
for s in losses[72:82]:
    print(s)
