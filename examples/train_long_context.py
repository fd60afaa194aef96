"""Train a small HF Llama (grouped-query attention) with context parallelism on local CPU ranks.

    autopar run examples/train_long_context.py --nproc 4

The mesh dp=2 x cp=2 splits the batch over dp and every sequence over cp; attention runs as ring
attention (K/V blocks passed round the cp ring, causal work balanced zig-zag). Pass
context_parallel="ulysses" for the all-to-all scheme, or leave it out and let the solver choose
per layer. The plan says which scheme each layer got and what the others would have cost
(`autopar inspect long_context_plan.json`).
"""

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import autopar


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                      attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))
    pm = autopar.compile(model, autopar.Mesh({"dp": 2, "cp": 2}), example_inputs=(ids,), context_parallel="ring")
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
        pm.plan.save("long_context_plan.json")
        print(sorted({n["name"]: n["attention"] for n in pm.plan.nodes if n.get("attention")}.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
