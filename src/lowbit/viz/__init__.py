"""Pictures of a run: DQA attention over training (003 Figure 3) and loss surfaces (003 Figure 4).

Plain functions that write a PNG and return its path (matplotlib, Agg backend); ``lowbit report``
calls them.

>>> from lowbit.viz import plot_attention, loss_surface
>>> plot_attention("runs/dqa_w2_minmax")                       # runs/dqa_w2_minmax/attention_<layer>.png
>>> loss_surface("configs/dqa_w2_minmax.yaml", "surface.png")  # FP32 | Q_1 alone | DQA mixture
"""

from .attention import plot_attention
from .loss_surface import filter_normalized_direction, loss_surface, roughness
from .sinreq import plot_bits, plot_weight_histogram, sinreq_report

__all__ = ["plot_attention", "loss_surface", "filter_normalized_direction", "roughness", "plot_bits",
           "plot_weight_histogram", "sinreq_report"]
