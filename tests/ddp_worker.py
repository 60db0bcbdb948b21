"""Run by tests/test_distributed.py under torchrun: train, then dump this rank's trained tensors."""

import sys
from pathlib import Path

import torch

from sar_kd.config import config_from_args
from sar_kd.trainer import Trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = config_from_args(sys.argv[1:])
    trainer = Trainer(cfg)
    trainer.run()
    rank = trainer.accelerator.process_index
    state = {f"student.{k}": v for k, v in trainer.model.student.state_dict().items()}
    state.update(trainer.router_update())
    torch.save(state, Path(cfg.output_dir) / f"rank{rank}_of_{trainer.accelerator.num_processes}.pt")
