"""A fine-tuning run in its own process, for the kill-and-resume test.

    python resume_worker.py OUT.pt CKPT_DIR [--resume] [--kill-at STEP]

With ``--kill-at`` the process SIGKILLs itself once the progress callback reports that step (after the
checkpoint for an earlier step was written), like a preempted job.
"""
import os
import signal
import sys

import numpy as np
import torch

from calib_data.shards import Shard
from sapp_compress import PruneConfig, TrainConfig, prune, zoo


def main() -> None:
    out, ckpt = sys.argv[1], sys.argv[2]
    resume = "--resume" in sys.argv
    lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 3e-3
    kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None
    torch.manual_seed(0)
    model = zoo.mlp([32, 64, 64, 4])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32)).astype(np.float32)
    y = (x[:, :4].argmax(1)).astype(np.int64)

    def progress(ev):  # the fine-tune's steps (the lr probe and the stages send events too)
        if kill_at is not None and ev.get("stage") == "fine-tune" and ev["step"] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    res = prune(model, Shard(inputs=(x,), y=y, source="resume-test"),
                PruneConfig(block="8", sparsity=0.75, min_blocks=4),
                TrainConfig(steps=120, batch_size=32, lr=lr, log_every=1, checkpoint_dir=ckpt,
                            checkpoint_every=10, resume=resume),
                progress=progress)
    torch.save({"state": res.model.state_dict(), "kept": [lb.kept for lb in res.layers]}, out)


if __name__ == "__main__":
    main()
