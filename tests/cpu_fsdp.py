"""FSDP on CPU processes (gloo), for the tests only. The sharding, gathering, checkpointing and
export logic under test is the same as on GPUs; three things differ, each GPU-specific in Lightning
or torch:

- Lightning allows FSDPStrategy on GPUs only (its check compares the exact type: a subclass passes);
- it passes no device to FSDP for a CPU root, and torch's FSDP then looks for an accelerator;
- its full state dicts offload to CPU, which on a CPU device frees memory that is still being
  cloned (a segfault in torch's state-dict hook); here they are gathered without the offload.
"""

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel


def _full_state_dict_context(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    return FullyShardedDataParallel.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_context  # this process runs CPU FSDP only
        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )  # fmt: skip
