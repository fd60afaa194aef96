"""Train a small HF GPT-2 with autopar on local CPU ranks.

    autopar run examples/train_dp_tp.py --nproc 4
"""

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import autopar


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, attn_implementation="sdpa",
                     use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    pm = autopar.compile(model, autopar.Mesh({"dp": 2, "tp": 2}), example_inputs=(ids,))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    for step in range(5):
        logits = pm(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if dist.get_rank() == 0:
        pm.plan.save("plan.json")
        print(pm.plan.summary())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
