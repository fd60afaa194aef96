"""Train a small HF Mixtral (mixture of experts, built from a config) with expert parallelism on CPU ranks.

    autopar run examples/train_mixtral_ep.py --nproc 4                          # dp=2 x ep=2, 2 layers, 5 steps
    autopar run examples/train_mixtral_ep.py --nproc 2 -- --small --mesh ep=2   # 1 layer, 2 steps (the test)

autopar finds each MoE layer on the traced graph (router top-k, expert weights with a leading
expert dim, rows gathered per pick and summed back per token) and fuses it into one
``autopar.moe`` node. The pins shard the experts over ``ep``, so every MoE layer runs expert
parallel: tokens go to their experts' owners by all-to-all and come back. (On a model this
small the solver would rather replicate the experts; ``--auto`` shows its plan.) Dense layers use
``ep`` as one more data axis. Every step is checked against the same model trained in one
process; the script prints the largest differences and exits with status 1 if one is over the
tolerance.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

import autopar
import common  # examples/common.py: the harness every training example shares

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half the batch
    "moe_*": {"ep": "S(0)"},  # every MoE layer: experts sharded over ep, tokens moved by all-to-all
    "*experts*": {"ep": "S(0)"},  # the expert weights: each ep rank holds its share of the experts
}


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main() -> int:
    args = common.parse(common.arg_parser(__doc__, mesh="dp=2,ep=2"))
    layers, hidden, vocab, (batch, seq) = (1, 32, 64, (4, 8)) if args.small else (2, 64, 256, (8, 32))

    rank = common.start()
    mesh = autopar.Mesh.parse(args.mesh)
    cfg = MixtralConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden + hidden // 2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        vocab_size=vocab, max_position_embeddings=seq, attn_implementation="sdpa", use_cache=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = MixtralForCausalLM(cfg)
    ids = common.token_ids(vocab, batch, seq)
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=common.pins(LAYOUT, mesh, args.auto))
    if rank == 0:
        print(pm.plan.summary())
        layouts = sorted({n["moe"]["layout"] for n in pm.plan.nodes if n.get("moe")})
        print(f"MoE layers: {sum(1 for n in pm.plan.nodes if n.get('moe'))}, layout {', '.join(layouts)}")
    return common.train_and_compare(pm, ref, lambda m: next_token_loss(m(ids).logits, ids), args.steps)


if __name__ == "__main__":
    raise SystemExit(main())
