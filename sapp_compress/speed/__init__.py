"""``--target-speedup``: per-family widths chosen by measured latency. The latency table and the whole-model
timer (:mod:`.table`), the allocation of widths against the loss (:mod:`.allocate`), and the measured check of
the written model with its corrective round (:mod:`.target`)."""
