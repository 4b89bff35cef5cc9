"""Constants shared by the data pipeline and the loss, in a module with no imports at all.

`sftune.objectives.loss` imports `IGNORE_INDEX` from here, so the label value that packing writes
and the value the loss skips are one name; importing it costs nothing (no torch, no numpy).
"""

IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross_entropy default ignore_index)
