# DQA row with unfused mixtures and SAWB's old auto alpha (closed form at 2/3/4/5/8 bits, no fallback)
import sys
import lowbit.quant.uniform as U
orig = U.SAWBQuantizer.__init__
def init(self, bits, role="weight", per_channel=False, alpha="auto"):
    orig(self, bits, role, per_channel, "closed_form" if alpha == "auto" and bits in U.SAWB_COEFFS else alpha)
U.SAWBQuantizer.__init__ = init
sys.argv = [sys.argv[0], "benchmarks/results/dqa_table/W2A2_PACT-SAWB_DQA_2_4_8/seed0", "--unfused-mixtures",
            "--out", "/tmp/rerun_oldsawb"]
sys.path.insert(0, "benchmarks")
import runpy
runpy.run_path("benchmarks/rerun_rows.py", run_name="__main__")
