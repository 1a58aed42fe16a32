import sys, torch
exec(open("benchmarks/results/integer_export/seeds_ft/freeze_probe/steps.py").read().split("lowbit.run(cfg")[0])
gn = {}
orig2 = M.Method.train_step
def ts2(self, model, batch, opt, step):
    if step in (73, 74, 75, 76, 77):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = orig2(self, model, batch, opt, step)
    if step in (73, 74, 75, 76, 77):
        gn[step] = {n: ((p.detach() - before[n]).norm() / (before[n].norm() + 1e-12)).item() for n, p in model.named_parameters()}
    return r
M.Method.train_step = ts2
lowbit.run(cfg, Path(sys.argv[2]))
names = sorted(gn[75], key=lambda n: -gn[76][n])[:12]
for n in names:
    print(f"{n:60s}", " ".join(f"{gn[s][n]:.2e}" for s in (73, 74, 75, 76, 77)))
