"""Train a small HF Llama (grouped-query attention) with context parallelism on CPU ranks, dp=2 x cp=2.

    autopar run examples/train_long_context.py --nproc 4                         # 2 layers, 4 x 128 tokens, 5 steps
    autopar run examples/train_long_context.py --nproc 2 -- --small --mesh cp=2  # 1 layer, 2 x 16 tokens (the test)

The ``cp`` axis splits every sequence; attention runs as ring attention (K/V blocks passed round
the cp ring, causal work balanced zig-zag, partial results merged by log-sum-exp). Pass
``--context-parallel ulysses`` for the all-to-all scheme, or ``auto`` to let the solver choose per
layer. The plan says which scheme each layer got and what the others would have cost
(``autopar inspect long_context_plan.json``). Every step is checked against the same model
trained in one process; the script prints the largest differences and exits with status 1 if one
is over the tolerance.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar
import common  # examples/common.py: the harness every training example shares

LAYOUT = {"embedding": {"dp": "S(0)"}}  # the token embedding's output: each dp rank takes half the batch


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main() -> int:
    ap = common.arg_parser(__doc__, mesh="dp=2,cp=2", auto=False)
    ap.add_argument("--context-parallel", choices=["ring", "ulysses", "auto"], default="ring")
    args = common.parse(ap)
    layers, vocab, (batch, seq) = (1, 64, (2, 16)) if args.small else (2, 256, (4, 128))

    rank = common.start()
    mesh = autopar.Mesh.parse(args.mesh)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = common.token_ids(vocab, batch, seq)
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), context_parallel=args.context_parallel,
                         pins=common.pins(LAYOUT, mesh) or None)
    if rank == 0:
        print(pm.plan.summary())
        schemes = sorted({n["attention"] for n in pm.plan.nodes if n.get("attention")})
        print(f"attention layers: {sum(1 for n in pm.plan.nodes if n.get('attention'))}, scheme {', '.join(schemes)}")
    status = common.train_and_compare(pm, ref, lambda m: next_token_loss(m(ids).logits, ids), args.steps)
    if rank == 0:
        pm.plan.save("long_context_plan.json")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
