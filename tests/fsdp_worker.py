"""Worker for the FSDP test: ``rkif run``'s own loop (train, evaluate, checkpoint) on a tiny LLaMA + LoRA,
for Recurrent-KIF, replay and EWC, with the Trainer's FSDP2 (``fsdp=True``) when run under torchrun.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT fsdp     # per-device batch 4, FSDP2 over 2 processes
    python tests/fsdp_worker.py OUT single                        # one process, batch 8: the reference

Each process writes OUT/rank<r>.json: every run's results, the all-reduce calls of each Eq. 8 mask
(4 radix passes per threshold), how the parameters were split, and the error of a refused method.
Accelerate 1.15 turns FSDP on only for accelerator devices: on CPU a ``fsdp=True`` Trainer silently
runs DDP (``AcceleratorState`` keeps ``MULTI_CPU``), so ``fsdp_on_cpu`` sets on the Trainer's accelerator
the state it sets on a GPU; everything after (``fully_shard`` through accelerate's
``fsdp2_prepare_model``, the training loop, gloo collectives) is the stock code.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from rkif import runner, training  # noqa: E402
from rkif.backbones import BackboneConfig, CausalBackbone  # noqa: E402
from rkif.config import RunConfig  # noqa: E402
from rkif.methods import rkif as rkif_method  # noqa: E402
from tests.conftest import write_tasks  # noqa: E402
from tests.test_backbones import tokenizer  # noqa: E402

FSDP_CONFIG = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}   # each layer its own unit (the default too)


def fsdp_on_cpu() -> None:
    """Every Trainer rkif builds gets ``fsdp=True`` and, on CPU, the FSDP state accelerate gives a GPU run."""
    class FSDPArguments(TrainingArguments):
        def __post_init__(self):
            self.fsdp, self.fsdp_config = True, dict(FSDP_CONFIG)
            super().__post_init__()

    create = Trainer.create_accelerator_and_postprocess

    def create_with_fsdp(self):
        create(self)
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True

    training.TrainingArguments = FSDPArguments
    Trainer.create_accelerator_and_postprocess = create_with_fsdp


BUILT: list[CausalBackbone] = []


def tiny_llama(cfg: BackboneConfig, peft_config=None) -> CausalBackbone:
    """Two LLaMA layers, LoRA r=3 on q and v: lora_A (3 x 16) is split unevenly (2 + 1 rows) over 2 processes."""
    tok = tokenizer()
    model_cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    BUILT.append(CausalBackbone(cfg, model=LlamaForCausalLM(model_cfg), tokenizer=tok, peft_config=peft_config))
    return BUILT[-1]


def count_mask_collectives() -> list[int]:
    """The all-reduce calls made by each ``binary_masks`` call of Recurrent-KIF (one threshold each)."""
    counts, calls = [], []
    all_reduce, binary_masks = dist.all_reduce, rkif_method.binary_masks

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    def masks(*args, **kwargs):
        calls.clear()
        out = binary_masks(*args, **kwargs)
        counts.append(len(calls))
        return out

    dist.all_reduce = counted
    rkif_method.binary_masks = masks
    return counts


def main(out: str, mode: str) -> None:
    out = Path(out)
    data = write_tasks(out / "data", {"alpha": (["yes", "no"], 16, 4), "beta": (["red", "blue"], 16, 4)})
    world = int(os.environ.get("WORLD_SIZE", "1"))
    runner.build_backbone = tiny_llama
    if mode == "fsdp":
        fsdp_on_cpu()
    counts = count_mask_collectives()
    record = {"results": {}, "mask_all_reduce_calls": counts}
    backbone = BackboneConfig(model="tiny-llama", family="causal", max_length=32, max_target_length=3,
                              lora_r=3, lora_dropout=0.0, eval_batch_size=4)
    # 16 examples a task, 8 kept: whole global batches of 8 (a padded last batch would differ from one process)
    for method in ("rkif", "replay", "ewc") if mode == "fsdp" else ("rkif", "replay"):
        options = {"inner_steps": 2, "outer_steps": 2, "outer_batch_size": 4} if method == "rkif" else {}
        run = RunConfig(method=method, method_options=options, backbone=backbone, data=str(data),
                        tasks=["alpha", "beta"], train_size=None, test_size=None, memory_fraction=0.5, epochs=4,
                        batch_size=8 // world, lr=0.02, lr_scheduler="constant", seed=5, output=str(out / method))
        try:
            result = runner.run_experiment(run)
        except ValueError as err:
            record["results"][method] = {"error": str(err)}
            continue
        record["results"][method] = {k: result.get(k) for k in ("accuracy", "initial_accuracy", "diagnostics")}
    record["fsdp_units"] = sum(isinstance(m, FSDPModule) for m in BUILT[0].modules())
    record["split"] = {n: [list(p.to_local().shape), list(p.shape)]       # the R-KIF run's parameters, after training
                       for n, p in BUILT[0].named_parameters() if isinstance(p, DTensor) and p.requires_grad}
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    if dist.is_initialized():      # a clean exit: gloo aborts at teardown otherwise
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
