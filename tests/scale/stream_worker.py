"""Fine-tune from a memory-mapped shard and print the peak memory growth (run in its own process)."""
import json
import resource
import sys
import threading
import time

import torch

from calib_data.shards import load_shard
from sapp_compress import PruneConfig, TrainConfig, prune, zoo


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def anon_mb() -> float:
    """Anonymous resident memory (what the process holds; mapped file pages are page cache the kernel
    can drop, which is the point of streaming, so they are not counted)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no RssAnon in /proc/self/status")


class AnonPeak(threading.Thread):
    """Samples RssAnon every 2 ms and keeps the maximum."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = anon_mb(), False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, anon_mb())
            time.sleep(0.002)


def main() -> None:
    train, evalp = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = zoo.mlp([256, 64, 10])
    ev = load_shard(evalp)
    # one-time runtime start-up (autograd, optimizer, thread pools) happens before the baseline, with a
    # small in-memory run of the same job
    prune(model, ev, PruneConfig(block="8", sparsity=0.75), TrainConfig(steps=20, batch_size=256),
          eval_shard=ev)
    base, base_rss = anon_mb(), rss_peak_mb()
    sampler = AnonPeak()
    sampler.start()
    shard = load_shard(train)
    res = prune(model, shard, PruneConfig(block="8", sparsity=0.75), TrainConfig(steps=300, batch_size=256),
                eval_shard=ev)
    sampler.stop = True
    sampler.join()
    print(json.dumps({"baseline_mb": base, "peak_mb": max(sampler.peak, anon_mb()),
                      "rss_incl_page_cache_growth_mb": rss_peak_mb() - base_rss, "kept": res.layers[0].n_kept,
                      "memmap": type(shard.inputs[0]).__name__, "samples": len(shard)}))


if __name__ == "__main__":
    main()
