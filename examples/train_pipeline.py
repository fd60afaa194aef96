"""Train a small HF Llama through a 3-D mesh (pipeline x data x tensor) on local CPU ranks.

    autopar run examples/train_pipeline.py --nproc 8

autopar splits the decoder layers into pipeline stages, lays out each stage over dp x tp, and
runs the plan's schedule; ``pm.train_step`` is the training loop's forward + backward.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar


def next_token_loss(out, ids):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, use_cache=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    pm = autopar.compile(model, autopar.Mesh({"pp": 2, "dp": 2, "tp": 2}), example_inputs=(ids,))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    for step in range(5):
        loss = pm.train_step(ids, target=ids, loss_fn=next_token_loss)
        opt.step()
        opt.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if dist.get_rank() == 0:
        pipe = pm.plan.pipeline
        print(f"{len(pipe['bounds'])} stages {pipe['bounds']}, schedule {pipe['schedule']}, "
              f"{pipe['microbatches']} microbatches")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
