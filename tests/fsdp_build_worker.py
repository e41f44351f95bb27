"""Run under `torchrun --nproc_per_node 2` by tests/test_parallel.py (not a test file itself).

`parallel.shard_from_rank0` where rank 0's model is not what the other ranks' config builds, or a rank
fails to build. Cases (argv[2]):
- untied: the config ties the embeddings, rank 0's weights are two different tensors (a checkpoint whose
  config says tied): every rank must end with rank 0's two tensors, and the sharded model's loss on one
  batch must equal rank 0's unsharded model's;
- fail0 / fail1: rank 0's build / rank 1's meta build raises a ValueError: every rank must raise it;
- mismatch: rank 0's model has a parameter of another shape: every rank must refuse.
Each rank writes what happened to argv[1]/rank{r}.json.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_step_worker import step, tiny_model  # noqa: E402

from quietstar import parallel  # noqa: E402


def main(out: str, case: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    thoughts = torch.randint(0, 97, (2, 2, 12, 2), generator=g)

    def build():
        model = tiny_model(tied=True)
        lm = model.lm
        if case == "untied":
            lm.lm_head.weight = torch.nn.Parameter(lm.model.embed_tokens.weight.detach() * 0.5 + 0.01)
        if case == "mismatch":
            model.mixing_head.net[-1].bias = torch.nn.Parameter(torch.zeros(2))
        if case == "fail0":
            raise ValueError("rank 0 cannot read the weights")
        return model

    def build_empty():
        if case == "fail1":
            raise ValueError("rank 1 cannot build the architecture")
        return tiny_model(tied=True)

    rec = {}
    try:
        model = parallel.shard_from_rank0(build, build_empty, torch.device("cpu"))
    except ValueError as e:
        rec["error"] = str(e)
    else:
        ref = build()
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        rec["equal"] = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
        rec["tied"] = model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
        rec["loss"] = float(step(model, ids, None, thoughts, "sample-then-train", "split"))
        rec["ref_loss"] = float(step(ref, ids, None, thoughts, "sample-then-train", "split"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    # Under load, the fail1 case's rank 0 sometimes aborted in the interpreter's teardown after all of the
    # above (SIGABRT; ~1 run in 10 on 2 busy cores, never with os._exit in 36). The CLI's aborts of that kind came
    # from a build error kept in a reference cycle (fixed in parallel._built_on_every_rank; 0 of 12 fail1 runs
    # without os._exit since), but what is checked is written by now: skip the teardown all the same.
    parallel.exit_process()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
