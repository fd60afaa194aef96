"""Train a small HF Llama (built from a config, nothing downloaded) on 4 CPU ranks, dp=2 x tp=2.

    autopar run examples/train_llama_2x2.py --nproc 4                 # 2 layers, hidden 64, 5 AdamW steps
    autopar run examples/train_llama_2x2.py --nproc 4 -- --small      # 1 layer, hidden 32, 2 steps (the test)

``LlamaForCausalLM`` goes to ``autopar.compile`` as it is: autopar traces it, plans it and runs
it with DTensor parameters under the same FQNs, so the optimizer and the training loop are the
usual ones. The pins lay it out Megatron-style (batch over ``dp``; q/k/v, gate and up split by
output features over ``tp``, o_proj and down_proj by input features); on a model this small the
solver alone would keep it replicated (``--auto`` shows its plan). Every step is checked against
the same model trained in one process; the script prints the largest differences and exits with
status 1 if one is over the tolerance. The plan is saved to llama_2x2_plan.json
(``autopar inspect llama_2x2_plan.json``).
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar
import common  # examples/common.py: the harness every training example shares

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half the batch
    "model.layers.*.self_attn.[qkv]_proj.weight": {"tp": "S(0)"},
    "model.layers.*.self_attn.o_proj.weight": {"tp": "S(1)"},
    "model.layers.*.mlp.gate_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.up_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.down_proj.weight": {"tp": "S(1)"},
}


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main() -> int:
    args = common.parse(common.arg_parser(__doc__, mesh="dp=2,tp=2"))
    layers, hidden, vocab, (batch, seq) = (1, 32, 64, (4, 8)) if args.small else (2, 64, 256, (8, 32))

    rank = common.start()
    mesh = autopar.Mesh.parse(args.mesh)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = common.token_ids(vocab, batch, seq)
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=common.pins(LAYOUT, mesh, args.auto))
    if rank == 0:
        print(pm.plan.summary())
    status = common.train_and_compare(pm, ref, lambda m: next_token_loss(m(ids).logits, ids), args.steps)
    if rank == 0:
        pm.plan.save("llama_2x2_plan.json")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
