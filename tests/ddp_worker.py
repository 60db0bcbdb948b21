"""Run by tests/test_distributed.py under torchrun: train, then dump this rank's trained tensors.

Every process writes ``rank<R>_of_<N>.pt``: the whole student state (``student.*``), the router
update, and the teacher's other tensors (``teacher.*``), gathered from the shards under --fsdp."""

import sys
from pathlib import Path

import torch

from sar_kd.config import config_from_args
from sar_kd.sharding import full_model_state
from sar_kd.trainer import Trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = config_from_args(sys.argv[1:])
    trainer = Trainer(cfg)
    trainer.run()
    rank = trainer.accelerator.process_index
    state = {f"student.{k}": v for k, v in full_model_state(trainer.model.student).items()}
    routers = trainer.router_update()
    state.update(routers)
    state.update({f"teacher.{k}": v for k, v in full_model_state(trainer.model.teacher).items() if k not in routers})
    torch.save(state, Path(cfg.output_dir) / f"rank{rank}_of_{trainer.accelerator.num_processes}.pt")
